"""Spark UDFs for notebooks and SQL, built on the sparkml_dist package."""

from udfs.predict import predict_udf, register_predict_udf

__all__ = ["predict_udf", "register_predict_udf"]
