"""spark-submit entry point for training.

    spark-submit jobs/train.py --config conf/digits.yaml [--set training.epochs=5 ...]
    spark-submit jobs/train.py --config conf/digits.yaml --resume RUN_ID
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pyspark.sql import SparkSession

from sparkml_dist import fit, load_config
from sparkml_dist.errors import SparkMLDistError
from sparkml_dist.tracking.redact import redact_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a PyTorch model on Spark with sparkml_dist.")
    parser.add_argument("--config", required=True, help="YAML job config, e.g. conf/digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.epochs=3")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even if the run's previous driver still looks alive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.set)
        spark = SparkSession.builder.appName("sparkml_dist-train").getOrCreate()
        result = fit(None, cfg, spark=spark, resume_run_id=args.resume,
                     force_resume=args.force_resume)
    except SparkMLDistError as exc:
        print(f"error: {redact_uri(str(exc))}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": result.run_id, "model_uri": result.model_uri,
                      "attempts": result.attempts, "metrics": result.metrics}, indent=2))
    print(f"MLflow run: {result.run_id}")
    uri = redact_uri(result.tracking_uri)  # a password stays out of the job's output
    print(f"Open it:    mlflow ui --backend-store-uri {uri} --port 5000  "
          f"-> http://127.0.0.1:5000/#/experiments/{result.experiment_id}/runs/{result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
