"""python -m batch_training: train, evaluate, recommend for every customer and publish a model.

Also runs under spark-submit (the session then comes with the submitter's master and settings):
    spark-submit --master spark://host:7077 batch_training/__main__.py --dataset online_retail ...

Exit codes: 0 published (or written with --no-publish); 2 bad configuration or input (an unknown
or malformed setting or --set, a missing column, an input that is missing, unreadable or has no
usable row); 3 the publish gate kept the current model (the reason is logged); 1 anything else.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch_training.data import DataSourceError  # noqa: E402
from batch_training.datasets import load_preset  # noqa: E402
from models.config import ConfigError, check_known_keys, config_text, known_keys, load_config  # noqa: E402
from models.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("batch_training")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m batch_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="extra YAML config layered over config/default.yaml (repeatable)")
    parser.add_argument("--dataset", metavar="NAME",
                        help="a preset from config/datasets/ (sample, online_retail, groceries, olist)")
    parser.add_argument("--datasets-dir", metavar="DIR", help="the folder holding the public datasets")
    parser.add_argument("--input", metavar="PATH", help="the raw transactions (overrides data.path)")
    parser.add_argument("--mode", choices=["implicit", "explicit"],
                        help="implicit feedback ALS (default) or explicit ratings with RMSE, like the old job")
    parser.add_argument("--no-cv", action="store_true",
                        help="skip cross-validation: train batch.als as given and serve the first of "
                             "batch.scorers.candidates (every candidate is still reported on the holdout)")
    parser.add_argument("--no-publish", action="store_true", help="write the model version but do not make it current")
    parser.add_argument("--write-table", action="store_true", help="also write every customer's list to DynamoDB")
    parser.add_argument("--write-topic", action="store_true",
                        help="also publish every list to the recommendations topic")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (secrets redacted) and exit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set batch.als.rank=32")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace):
    import yaml

    cfg = load_config(files=args.config or None)
    overrides: dict = {}
    if args.dataset:
        overrides["data"] = load_preset(args.dataset)
    if args.datasets_dir:
        overrides["data.datasets_dir"] = str(Path(args.datasets_dir).resolve())
    if args.input:
        overrides["data.path"] = str(Path(args.input).resolve()) if "://" not in args.input else args.input
    if args.mode == "explicit":
        overrides.update({"batch.als.implicit_prefs": False, "batch.selection_metric": "rmse",
                          "batch.publish.metric": "rmse"})
    if args.no_cv:
        overrides["batch.cv_folds"] = 0
    if args.no_publish:
        overrides["batch.publish.enabled"] = False
    if args.write_table:
        overrides["batch.write_table"] = True
    if args.write_topic:
        overrides["batch.write_topic"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like key.path=value")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            # The key only: the value may be a password (kafka.client_options.sasl.jaas.config).
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"--set {key.strip()}=...: the value is not valid YAML ({problem})") from None
    known = known_keys()
    for item in args.set:
        key = item.partition("=")[0].strip()
        # The key only in the message, never the value (it may be a password).
        check_known_keys([key], known, f"--set {key}=...")
    return _with_overrides(cfg, overrides)


def _with_overrides(cfg, overrides: dict):
    overrides = dict(overrides)
    # The preset replaces the whole data section; later dotted overrides refine it.
    data = overrides.pop("data", None)
    if data is not None:
        cfg = cfg.with_overrides({"data": {**data, "datasets_dir": cfg.get_path("data.datasets_dir", None)}})
    return cfg.with_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from batch_training.job import PublishRefused, run

    try:
        cfg = build_config(args)
        if args.print_config:
            print(config_text(cfg), end="")
            return 0
        result = run(cfg)
    except (ConfigError, DataSourceError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except PublishRefused as refused:
        log.error("exit 3: the publish gate kept the current model: %s", refused)
        return 3
    log.info("done: model %s %s; stage times: %s", result.version,
             "published as current" if result.published else "written (not current)",
             ", ".join(f"{name} {sec:.1f}s" for name, sec in result.stage_seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
