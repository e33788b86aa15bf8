"""Spark UDFs for notebooks and SQL, built on the sparkml_dist package.

An entry point of the checkout, not part of the wheel (which installs ``sparkml_dist`` alone):
code that installs the wheel imports :mod:`sparkml_dist.inference` directly.
"""

from udfs.predict import predict_udf, register_predict_udf

__all__ = ["predict_udf", "register_predict_udf"]
