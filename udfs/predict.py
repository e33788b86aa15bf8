"""Score rows with a PyTorch model from MLflow, from DataFrame code or SQL.

    from udfs import predict_udf, register_predict_udf
    predict = predict_udf("models:/digits@champion", tracking_uri=uri)
    df.select("id", predict("features").alias("p")).select("id", "p.prediction", "p.probability")

    register_predict_udf(spark, "predict_digit", "models:/digits/1", tracking_uri=uri)
    spark.sql("SELECT id, predict_digit(features).prediction FROM digits")

The library code lives in :mod:`sparkml_dist.inference`; this module only re-exports it.
"""

from sparkml_dist.inference import predict_udf, register_predict_udf

__all__ = ["predict_udf", "register_predict_udf"]
