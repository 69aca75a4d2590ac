"""Command line: `python -m modelfleet.scoring serve ...` (what containers and the local target run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError
from .settings import ServerSettings, env_name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.scoring")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP",
        description="Serve a model folder: a bare .onnx/.tflite file (no code) or an entry script. "
        "Each flag also reads an env var (MODELFLEET_<FLAG>); flags win.",
    )
    serve.add_argument("--config", type=Path, help="TOML file with the same settings ([serve] table)")
    serve.add_argument("--model-dir", help="model folder (AZUREML_MODEL_DIR is honoured)")
    serve.add_argument("--entry-script", help="score.py with init()/run(); omit for a bare model")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", help="port (default 5001; 0 = any free port)")
    serve.add_argument("--workers", help="processes sharing the port (default 1)")
    serve.add_argument("--model-name", help="name reported in metadata (default model)")
    serve.add_argument("--model-version", help="version reported in metadata (default 1)")
    serve.add_argument("--keys-file", help='JSON {"primary": ..., "secondary": ...}; re-read on change')
    serve.add_argument("--admin-key-file", help="token enabling POST /v2/repository/models/{name}/load")
    serve.add_argument("--max-body-bytes", help="larger bodies get 413 (default 16 MiB)")
    serve.add_argument("--scoring-timeout-ms", help="slower scoring gets 504 (default 60000)")
    serve.add_argument("--max-concurrent-requests", help="requests scored at once in the pool (default: CPUs)")
    serve.add_argument("--max-queued-requests", help="requests waiting for a slot before 503 (default max(32, 4x concurrency))")
    serve.add_argument("--inline-threshold-ms", help="models faster than this run on the event loop (default 1)")
    serve.add_argument("--keep-alive-s", help="close connections idle this long (default 75)")
    serve.add_argument("--load-timeout-s", help="refuse a model load (init() + warm-up) taking longer (default 300)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .settings import load_settings

    flags = {k: v for k, v in vars(args).items() if k not in {"command", "config"}}
    try:
        settings = load_settings(flags, config_file=args.config)
        if settings.model_dir is None:
            raise ConfigError("model_dir", "required")
        from .runner import configure_logging, serve

        configure_logging(settings.log_level)
        return serve(settings)
    except ConfigError as exc:
        print(_config_error_line(exc), file=sys.stderr)
        return 2


def _config_error_line(exc: ConfigError) -> str:
    known = exc.field in ServerSettings.__dataclass_fields__
    where = f" (--{exc.field.replace('_', '-')} / {env_name(exc.field)})" if known else ""
    return f"error: {exc.field}{where}: {exc.problem}"
