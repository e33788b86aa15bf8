"""spark-submit entry point for batch scoring with a model from MLflow.

    spark-submit jobs/predict.py --config conf/predict_digits.yaml [--set KEY=VALUE ...]
    (e.g. --set model_uri=runs:/RUN_ID/model --set output=out/preds)
"""

from __future__ import annotations

import argparse
import logging
import sys

from pyspark.sql import SparkSession

from sparkml_dist.config import load_dataclass
from sparkml_dist.errors import SparkMLDistError
from sparkml_dist.inference import PredictConfig, run_prediction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score a table or files with an MLflow model.")
    parser.add_argument("--config", required=True,
                        help="YAML config, e.g. conf/predict_digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set output=out/preds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_dataclass(PredictConfig, args.config, args.set)
        spark = SparkSession.builder.appName("sparkml_dist-predict").getOrCreate()
        result = run_prediction(cfg, spark)
    except SparkMLDistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.rows} predictions of {result.model_uri} to {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
