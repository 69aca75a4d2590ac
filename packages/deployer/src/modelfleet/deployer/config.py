"""Inference and deployment configs: Azure ML CLI-style JSON files plus flags.

`inferenceconfig.json` (`-ic`) says how to score, `deploymentconfig.json`
(`-dc`) where and how to run; the Azure ML v1 field names are accepted as
written, flags override the file, and an unknown or invalid field is an
error naming it. Relative paths in a file are resolved against the file's
folder, relative paths in flags against the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modelfleet.deployer.errors import ConfigError, DeployerError
from modelfleet.deployer.targets.base import DeploymentConfig, InferenceConfig

log = logging.getLogger(__name__)

COMPUTE_TYPES = {"local": "local", "docker": "docker", "aci": "aci", "aks": "kubernetes",
                 "kubernetes": "kubernetes", "iotedge": "iotedge"}  # fmt: skip

Check = Callable[[str, Any], Any]


# ---------------------------------------------------------------- value checks


def _fail(where: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {what}, got {json.dumps(value)}")


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, "a non-empty string", value)
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, "true or false", value)
    return value


def _int(low: int, high: int | None = None) -> Check:
    def check(where: str, value: Any) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise _fail(where, f"an integer {bound}", value)
        return int(value)

    return check


def _positive_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _fail(where, "a number > 0", value)
    return float(value)


def check_key(where: str, value: Any) -> str:
    """A service key as configs and `service regen-key --value` accept it."""
    text = _str(where, value)
    if len(text) < 8 or any(c.isspace() for c in text):
        raise _fail(where, "a key of at least 8 characters without spaces", value)
    return text


def _ignored(where: str, value: Any) -> None:
    log.info("config field ignored field=%s", where)


def _must_be_false(why: str) -> Check:
    def check(where: str, value: Any) -> None:
        if _bool(where, value):
            raise ConfigError(f"{where}: {why}")

    return check


def _object(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    return value


Schema = Mapping[str, "Check | Schema"]


def _check_fields(
    source: str, data: Mapping[str, Any], schema: Schema, prefix: str = ""
) -> dict[str, Any]:
    """Validate `data` against `schema`; errors read `SOURCE: field 'a.b': ...`."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        rule = schema.get(name)
        if rule is None:
            raise ConfigError(
                f"{source}: unknown field {dotted!r}",
                hint=f"known fields{' of ' + prefix[:-1] if prefix else ''}: "
                + ", ".join(sorted(schema)),
            )
        if isinstance(rule, Mapping):
            checked: Any = _check_fields(
                source, _object(f"{source}: field {dotted!r}", value), rule, f"{dotted}."
            )
        else:
            checked = rule(f"{source}: field {dotted!r}", value)
        if checked is not None:
            out[name] = checked
    return out


_INFERENCE_SCHEMA: Schema = {
    "entryScript": _str,
    "sourceDirectory": _str,
    "runtime": lambda w, v: _runtime(w, v),
    "condaFile": _str,
    "requirementsFile": _str,
    "baseImage": _str,
    "extraDockerfileSteps": _str,
    "enableGpu": _must_be_false("GPU images are not supported; remove the field or set it false"),
    "baseImageRegistry": _ignored,
    "cudaVersion": _ignored,
    "description": _ignored,
    "schemaFile": _ignored,
}

_RESOURCES_SCHEMA: Schema = {
    "cpu": _positive_number,
    "memoryInGB": _positive_number,
    "cpuLimit": _ignored,
    "memoryInGBLimit": _ignored,
    "gpu": _int(0, 0),
}

_AUTOSCALER_SCHEMA: Schema = {
    "autoscaleEnabled": _bool,
    "minReplicas": _int(1),
    "maxReplicas": _int(1),
    "targetUtilization": _int(1, 100),
    "refreshPeriodInSeconds": _ignored,
}

_DEPLOYMENT_SCHEMA: Schema = {
    "computeType": lambda w, v: _compute_type(w, v),
    "port": _int(1, 65535),
    "containerResourceRequirements": _RESOURCES_SCHEMA,
    "authEnabled": _bool,
    "tokenAuthEnabled": _must_be_false("token auth is not supported; use key auth (authEnabled)"),
    "primaryKey": check_key,
    "secondaryKey": check_key,
    "scoringTimeoutMs": _int(1),
    "maxConcurrentRequestsPerContainer": _int(1),
    "maxQueueWaitMs": _ignored,
    "numReplicas": _int(1),
    "autoScaler": _AUTOSCALER_SCHEMA,
    "sslEnabled": _must_be_false("TLS is not terminated by modelfleet; put a proxy in front"),
    "sslCertificate": _ignored,
    "sslKey": _ignored,
    "sslCname": _ignored,
    "appInsightsEnabled": _ignored,
    "collectModelData": _ignored,
    "location": _ignored,
    "dnsNameLabel": _ignored,
    "description": _ignored,
    "tags": _ignored,
    "properties": _ignored,
    "livenessProbeRequirements": _ignored,
    "namespace": _ignored,
}


def _runtime(where: str, value: Any) -> str:
    text = _str(where, value).lower()
    if text not in ("python", "python3"):
        raise _fail(where, '"python"', value)
    return "python"


def _compute_type(where: str, value: Any) -> str:
    text = _str(where, value).lower()
    if text not in COMPUTE_TYPES:
        raise _fail(where, f"one of {', '.join(sorted(COMPUTE_TYPES))}", value)
    return COMPUTE_TYPES[text]


# ---------------------------------------------------------------- files


def read_text_file(path: Path, kind: str, error: type[DeployerError] = ConfigError) -> str:
    """A user's UTF-8 file, or `error` naming the file (as `kind`) and what is wrong with it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(f"{kind} file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {kind} file {path}: {exc}") from exc


def read_config_file(path: Path, kind: str) -> dict[str, Any]:
    text = read_text_file(path, kind)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            hint=f"fix the {kind} file; see docs for an example",
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def load_inference_config(
    path: Path | None = None, *, overrides: Mapping[str, Any] | None = None
) -> InferenceConfig:
    """From `inferenceconfig.json` (optional) and flags (Azure ML field names as keys)."""
    values: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        data = read_config_file(path, "inference config")
        values = _check_fields(path.name, data, _INFERENCE_SCHEMA)
        base = path.parent
    resolved: dict[str, Path] = {
        k: _resolve(base, v)
        for k, v in values.items()
        if k in ("sourceDirectory", "condaFile", "requirementsFile", "extraDockerfileSteps")
    }
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        checked = _check_fields("flags", {key: value}, _INFERENCE_SCHEMA)
        values.update(checked)
        if key in ("sourceDirectory", "condaFile", "requirementsFile", "extraDockerfileSteps"):
            resolved[key] = _resolve(Path.cwd(), str(value))

    entry: str | None = values.get("entryScript")
    source = resolved.get("sourceDirectory")
    if source is not None and not source.is_dir():
        raise ConfigError(f"sourceDirectory {source} does not exist or is not a folder")
    if entry is not None:
        if source is None:
            # Azure ML resolves a bare entry script against the current folder;
            # make its folder the source directory so the script's imports work.
            script = _resolve(base, entry)
            source, entry = script.parent, script.name
        if not (source / entry).is_file():
            raise ConfigError(
                f"entryScript {entry} not found in {source}",
                hint="entryScript is relative to sourceDirectory",
            )
    for key in ("condaFile", "requirementsFile", "extraDockerfileSteps"):
        if key in resolved and not resolved[key].is_file():
            raise ConfigError(f"{key} {resolved[key]} does not exist")
    return InferenceConfig(
        source_directory=source.resolve() if source is not None else None,
        entry_script=entry,
        runtime=values.get("runtime", "python"),
        requirements_file=_abs(resolved.get("requirementsFile")),
        conda_file=_abs(resolved.get("condaFile")),
        base_image=values.get("baseImage"),
        extra_dockerfile_steps=_abs(resolved.get("extraDockerfileSteps")),
    )


def _abs(path: Path | None) -> Path | None:
    return path.resolve() if path is not None else None


def load_deployment_config(
    path: Path | None = None, *, overrides: Mapping[str, Any] | None = None
) -> tuple[DeploymentConfig, str | None]:
    """From `deploymentconfig.json` (optional) and flags; also returns the target
    named by `computeType` (None when not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path, "deployment config")
        values = _check_fields(path.name, data, _DEPLOYMENT_SCHEMA)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("cpu", "memoryInGB"):
            checked = _check_fields("flags", {key: value}, _RESOURCES_SCHEMA)
            values.setdefault("containerResourceRequirements", {}).update(checked)
        else:
            values.update(_check_fields("flags", {key: value}, _DEPLOYMENT_SCHEMA))
    resources: dict[str, Any] = values.get("containerResourceRequirements", {})
    scaler: dict[str, Any] = values.get("autoScaler", {})
    defaults = DeploymentConfig()
    config = DeploymentConfig(
        port=values.get("port"),
        cpu_cores=resources.get("cpu", defaults.cpu_cores),
        memory_gb=resources.get("memoryInGB", defaults.memory_gb),
        replicas=values.get("numReplicas", defaults.replicas),
        auth_enabled=values.get("authEnabled", defaults.auth_enabled),
        primary_key=values.get("primaryKey"),
        secondary_key=values.get("secondaryKey"),
        scoring_timeout_ms=values.get("scoringTimeoutMs", defaults.scoring_timeout_ms),
        max_concurrent_requests=values.get(
            "maxConcurrentRequestsPerContainer", defaults.max_concurrent_requests
        ),
        autoscale_enabled=scaler.get("autoscaleEnabled", defaults.autoscale_enabled),
        autoscale_min_replicas=scaler.get("minReplicas", defaults.autoscale_min_replicas),
        autoscale_max_replicas=scaler.get("maxReplicas", defaults.autoscale_max_replicas),
        autoscale_target_utilization=scaler.get(
            "targetUtilization", defaults.autoscale_target_utilization
        ),
    )
    if config.autoscale_min_replicas > config.autoscale_max_replicas:
        raise ConfigError("autoScaler: minReplicas is greater than maxReplicas")
    if config.primary_key and config.primary_key == config.secondary_key:
        raise ConfigError("primaryKey and secondaryKey must differ")
    return config, values.get("computeType")


# ---------------------------------------------------------------- persistence


def to_jsonable(config: InferenceConfig | DeploymentConfig) -> dict[str, Any]:
    """For the registry database and `--output json` (keys are left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("primary_key", "secondary_key"):
            continue
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def inference_from_jsonable(data: Mapping[str, Any]) -> InferenceConfig:
    paths = {"source_directory", "requirements_file", "conda_file", "extra_dockerfile_steps"}
    known = {f.name for f in dataclasses.fields(InferenceConfig)}
    kwargs: dict[str, Any] = {
        k: (Path(v) if k in paths and v is not None else v) for k, v in data.items() if k in known
    }
    return InferenceConfig(**kwargs)


def deployment_from_jsonable(data: Mapping[str, Any]) -> DeploymentConfig:
    known = {f.name for f in dataclasses.fields(DeploymentConfig)}
    return DeploymentConfig(**{k: v for k, v in data.items() if k in known})
