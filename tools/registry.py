"""python -m tools models {list|show|compare|promote|rollback|prune}: the model registry.

Works on the model store of the config (``model_store.uri``: a folder or s3://bucket/prefix), or
on the one given with ``--store``:

  list                      every version: model type, published, current, cutoff, key metric
  show VERSION              its metadata (params, lineage, stats) and metrics
  compare A B               metrics side by side with the relative change, and the params that differ
  promote VERSION [--force] make VERSION current if the batch job's publish gate passes it (its
                            recorded holdout metrics against popularity and the current model's, with
                            the batch.publish settings of the config) and every file verifies; --force
                            promotes a version the gate refuses (never one that does not verify); a
                            version written with --no-publish can be promoted
  rollback                  make the previous published version (created before the current) current
  prune --keep N [--yes]    delete old versions (a dry run without --yes); never the current one, the
                            one a rollback would go to, the N most recently published, nor any
                            version created after the current one (a candidate)

Exit codes: 0 done, 1 nothing found (no such version, nothing to roll back to), 2 bad arguments, a
version that does not verify or one the publish gate refuses (without --force), 3 the store cannot
be reached.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from models.config import ConfigError, load_config
from models.store import ModelLoadError, ModelStore, ModelStoreError
from tools import EXIT_BAD_INPUT, EXIT_NOTHING, EXIT_OK, EXIT_UNREACHABLE, quiet_client_logs


class _Exit(Exception):
    """A command's end other than success: the message goes to stderr, the code to the shell."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# -- reading metadata ---------------------------------------------------------------------------
def model_metrics(metadata: dict) -> dict[str, float]:
    """The model's own holdout metrics, flattened: ``map@10``, ``ndcg@10 (purchased incl.)``, ``rmse``..."""
    metrics = metadata.get("metrics") or {}
    k = metrics.get("k")
    flat: dict[str, float] = {}
    for table, suffix in (("exclude_purchased", ""), ("include_purchased", " (purchased incl.)")):
        for name, value in (((metrics.get(table) or {}).get("model")) or {}).items():
            if _number(value) and name not in ("users", "k"):
                flat[f"{name}@{k}{suffix}" if k else f"{name}{suffix}"] = float(value)
    test_rmse = (metrics.get("rmse") or {}).get("test") if isinstance(metrics.get("rmse"), dict) else None
    if _number(test_rmse):
        flat["rmse (test)"] = float(test_rmse)
    for name, value in metrics.items():          # plain {"map": 0.1} metrics
        if _number(value) and name != "k":
            flat[name] = float(value)
    return flat


def key_metric(metadata: dict) -> tuple[str | None, float | None]:
    """The metric the job selected and gated by (e.g. ``map@10``) and the model's value of it."""
    metrics = metadata.get("metrics") or {}
    flat = model_metrics(metadata)
    name = (metrics.get("selection") or {}).get("metric")
    if name == "rmse":
        label = "rmse (test)"
    elif name:
        label = f"{name}@{metrics['k']}" if metrics.get("k") else name
    else:
        label = next(iter(flat), None)
    return label, flat.get(label) if label else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, metric: bool = False) -> str:
    """A value for a table cell: metrics with 4 decimals, settings as written (long ones cut)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if metric else f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# -- the commands -------------------------------------------------------------------------------
def _published_at(store: ModelStore) -> dict[str, str]:
    return {e["version"]: e["published_at"] for e in store.history()}


def _metadata(store: ModelStore, version: str) -> dict:
    if version not in store.list_versions():
        raise _Exit(EXIT_NOTHING, f"no model version {version!r} in {store.uri} (python -m tools models list)")
    try:
        return store.load_metadata(version)
    except ModelLoadError as err:
        raise _Exit(EXIT_BAD_INPUT, str(err)) from None


def list_rows(store: ModelStore) -> list[dict]:
    """One dict per version (oldest first): version, model_type, created_at, published_at, current,
    cutoff_time, key_metric, key_metric_value; a version whose metadata cannot be read has an error."""
    current, published = store.current_version(), _published_at(store)
    rows = []
    for version in store.list_versions():
        row: dict[str, Any] = {"version": version, "current": version == current,
                               "published_at": published.get(version)}
        try:
            metadata = store.load_metadata(version)
        except ModelLoadError as err:
            rows.append({**row, "error": str(err)})
            continue
        label, value = key_metric(metadata)
        rows.append({**row, "model_type": metadata.get("model_type"), "created_at": metadata.get("created_at"),
                     "cutoff_time": metadata.get("cutoff_time"), "key_metric": label, "key_metric_value": value})
    return rows


def cmd_list(store: ModelStore, args) -> int:
    rows = list_rows(store)
    if not rows:
        raise _Exit(EXIT_NOTHING, f"no model versions in {store.uri}: run the batch job to write one")
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(table(["", "version", "type", "published", "cutoff", "key metric"],
                [["*" if r["current"] else "", r["version"], r.get("model_type") or "?",
                  r["published_at"] or "-", r.get("cutoff_time") or "-",
                  f"{r['key_metric']} {_fmt(r['key_metric_value'], True)}" if r.get("key_metric")
                  else r.get("error", "-")] for r in rows]))
    print(f"\n{len(rows)} versions in {store.uri}; * = current")
    return EXIT_OK


def cmd_show(store: ModelStore, args) -> int:
    metadata = _metadata(store, args.version)
    pointer = store.current_pointer()
    published = _published_at(store).get(args.version)
    if args.json:
        shown = {k: v for k, v in metadata.items() if k != "files"}
        print(json.dumps({**shown, "current": bool(pointer and pointer["version"] == args.version),
                          "published_at": published}, indent=2, sort_keys=True))
        return EXIT_OK
    is_current = bool(pointer and pointer["version"] == args.version)
    lines = [f"version      {args.version}{'  (current)' if is_current else ''}",
             f"model type   {metadata.get('model_type')}",
             f"created      {metadata.get('created_at') or '-'}",
             f"published    {published or 'never'}",
             f"cutoff       {metadata.get('cutoff_time') or '-'}",
             f"size         {metadata.get('n_items')} products, {metadata.get('n_users')} customers, "
             f"rank {metadata.get('rank')}"]
    for title in ("lineage", "params", "stats"):
        flat = _flatten(metadata.get(title) or {})
        lines.append(f"\n{title}:" + ("" if flat else " (not recorded)"))
        lines += [f"  {name:<28} {_fmt(value)}" for name, value in flat.items()]
    metrics = model_metrics(metadata)
    lines.append("\nmetrics:" + ("" if metrics else " (none recorded)"))
    if metrics:
        lines.append(table(["metric", "value"], [[name, _fmt(value, True)] for name, value in metrics.items()]))
    print("\n".join(lines))
    return EXIT_OK


def compare(store: ModelStore, a: str, b: str) -> dict:
    """{"metrics": [(name, a, b, relative change)], "params": [(name, a, b)] that differ}."""
    meta_a, meta_b = _metadata(store, a), _metadata(store, b)
    metrics_a, metrics_b = model_metrics(meta_a), model_metrics(meta_b)
    rows = []
    for name in [*metrics_a, *(n for n in metrics_b if n not in metrics_a)]:
        va, vb = metrics_a.get(name), metrics_b.get(name)
        change = (vb - va) / abs(va) if va not in (None, 0) and vb is not None else None
        rows.append((name, va, vb, change))
    params_a, params_b = _flatten(meta_a.get("params") or {}), _flatten(meta_b.get("params") or {})
    params = [(name, params_a.get(name), params_b.get(name))
              for name in sorted(set(params_a) | set(params_b)) if params_a.get(name) != params_b.get(name)]
    return {"model_type": (meta_a.get("model_type"), meta_b.get("model_type")), "metrics": rows, "params": params}


def cmd_compare(store: ModelStore, args) -> int:
    diff = compare(store, args.a, args.b)
    print(f"A = {args.a} ({diff['model_type'][0]}), B = {args.b} ({diff['model_type'][1]})\n")
    print(table(["metric", "A", "B", "change"],
                [[n, _fmt(va, True), _fmt(vb, True), "-" if c is None else f"{c:+.1%}"]
                 for n, va, vb, c in diff["metrics"]])
          if diff["metrics"] else "no metrics recorded")
    print()
    print(table(["param", "A", "B"], [[n, _fmt(va), _fmt(vb)] for n, va, vb in diff["params"]])
          if diff["params"] else "same params")
    return EXIT_OK


def gate_verdict(store: ModelStore, cfg, version: str, metadata: dict) -> tuple[bool, str]:
    """The batch job's publish gate (``batch_training.publish.gate_decision``) on ``version``'s recorded
    holdout metrics against the current model's, with the config's ``batch.publish`` settings: the
    same verdict the job gave (or, under --no-publish, would have given) when it wrote the version,
    unless the current model or the settings changed since. (ok, reason)."""
    from batch_training.job_settings import metric_for_gate
    from batch_training.publish import gate_decision
    from batch_training.train import AlsParams

    metrics = metadata.get("metrics") or {}
    # The gate metric as the job chose it: batch.publish.metric for a model of implicit feedback;
    # the test RMSE for one of explicit ratings, as `python -m batch_training --mode explicit` sets it.
    implicit = bool((metadata.get("params") or {}).get("implicit_prefs", True))
    metric = metric_for_gate(cfg if implicit else cfg.with_overrides({"batch.publish.metric": "rmse"}),
                             AlsParams(implicit_prefs=implicit))
    # The table the job served and gated by (purchased products excluded or not), as it recorded it.
    exclude = bool(metrics.get("exclude_purchased_main", cfg.get_path("batch.exclude_purchased", True)))
    try:
        return gate_decision(cfg, metrics, metric, exclude, _current_metrics(store))
    except (KeyError, TypeError, AttributeError) as err:     # metrics not shaped as the batch job writes them
        missing = f"no {err} entry" if isinstance(err, KeyError) else f"an unusable entry ({err})"
        return False, (f"the gate cannot judge it: its recorded metrics have {missing} for the gate metric "
                       f"{metric!r} (the batch job records the model's and popularity's holdout metrics)")


def _current_metrics(store: ModelStore) -> dict | None:
    """The current model's recorded metrics, which the gate compares with; None when there is none
    (or it cannot be read: then the gate compares with popularity only, as the batch job does)."""
    current = store.current_version()
    if current is None:
        return None
    try:
        return store.load_metadata(current).get("metrics")
    except ModelLoadError as err:
        print(f"warning: the current model {current} cannot be read ({err}): the gate compares with "
              "popularity only", file=sys.stderr)
        return None


def cmd_promote(store: ModelStore, args) -> int:
    metadata = _metadata(store, args.version)
    if store.current_version() == args.version:
        print(f"version {args.version} is already current in {store.uri}")
        return EXIT_OK
    previous = store.current_version()
    ok, reason = gate_verdict(store, args.cfg, args.version, metadata)
    if not ok and not args.force:
        raise _Exit(EXIT_BAD_INPUT, f"the publish gate refuses {args.version}: {reason}; the current model stays "
                                    f"{previous or '(none)'}. To promote it anyway: python -m tools models "
                                    f"promote {args.version} --force")
    try:
        store.set_current(args.version)          # verifies every file first, --force or not
    except ModelLoadError as err:
        raise _Exit(EXIT_BAD_INPUT, f"{err}; the current model stays {previous or '(none)'}") from None
    if not ok:
        print(f"WARNING: --force: {args.version} promoted although the publish gate refuses it: {reason}",
              file=sys.stderr)
    print(f"promoted {args.version}: it is now current in {store.uri} (was {previous or 'none'}); "
          + (f"the publish gate passes it: {reason}" if ok else "FORCED past the publish gate (--force)"))
    return EXIT_OK


def cmd_rollback(store: ModelStore, args) -> int:
    current = store.current_version()
    if current is None:
        raise _Exit(EXIT_NOTHING, f"no current model in {store.uri}: nothing to roll back")
    target = store.previous_published(current)
    while target is not None:
        try:
            store.set_current(target)
        except ModelLoadError as err:
            print(f"skipped {target}: {err}", file=sys.stderr)
            target = store.previous_published(target)
            continue
        print(f"rolled back to {target} (published before {current}); it is now current in {store.uri}")
        return EXIT_OK
    raise _Exit(EXIT_NOTHING, f"no usable published version older than the current {current} in {store.uri}: "
                              "nothing to roll back to")


def cmd_prune(store: ModelStore, args) -> int:
    if args.keep < 0:
        raise _Exit(EXIT_BAD_INPUT, f"--keep {args.keep}: use a whole number >= 0")
    if store.current_version() is None:
        print(f"no current model in {store.uri}: nothing is pruned before the first publish")
        return EXIT_OK
    doomed = store.prune(args.keep, dry_run=not args.yes)
    if not doomed:
        print(f"nothing to prune in {store.uri} (keeping the current version, its rollback target, "
              f"the {args.keep} most recently published and newer candidates)")
        return EXIT_OK
    verb = "deleted" if args.yes else "would delete"
    print(f"{verb} {len(doomed)} versions from {store.uri}:")
    print("\n".join(f"  {v}" for v in doomed))
    if not args.yes:
        print("dry run: add --yes to delete them")
    return EXIT_OK


COMMANDS = {"list": cmd_list, "show": cmd_show, "compare": cmd_compare, "promote": cmd_promote,
            "rollback": cmd_rollback, "prune": cmd_prune}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="URI",
                        help="the model store (a folder or s3://bucket/prefix); default model_store.uri")
    top = argparse.ArgumentParser(prog="python -m tools models", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", parents=[common], help="every version")
    listing.add_argument("--json", action="store_true", help="the rows as JSON")
    show = sub.add_parser("show", parents=[common], help="one version's metadata and metrics")
    show.add_argument("version")
    show.add_argument("--json", action="store_true", help="the metadata as JSON (without the file list)")
    diff = sub.add_parser("compare", parents=[common], help="two versions' metrics and params")
    diff.add_argument("a")
    diff.add_argument("b")
    promote = sub.add_parser("promote", parents=[common],
                             help="make a version current, if the publish gate passes it and it verifies")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true",
                         help="promote it even if the publish gate refuses it (a WARNING names the reason)")
    sub.add_parser("rollback", parents=[common], help="make the previous published version current")
    prune = sub.add_parser("prune", parents=[common], help="delete old versions (dry run without --yes)")
    prune.add_argument("--keep", type=int, required=True, metavar="N",
                       help="keep the N most recently published versions (besides the current one)")
    prune.add_argument("--yes", action="store_true", help="delete; without it, only list what would go")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_client_logs()
    try:
        cfg = load_config()
        if args.store:
            cfg = cfg.with_overrides({"model_store.uri": args.store})
        store = ModelStore.from_config(cfg)
        args.cfg = cfg                        # the gate's settings (batch.publish) for promote
        return COMMANDS[args.command](store, args)
    except _Exit as end:
        print(f"error: {end}", file=sys.stderr)
        return end.code
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelLoadError as err:            # e.g. an unreadable CURRENT pointer
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelStoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
