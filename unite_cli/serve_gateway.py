"""``unite serve-gateway``: its options, each overriding one ``UNITE_GATEWAY_*`` setting, and the server run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from teacher_gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# Command-line option of each settings field it overrides; an option left out keeps the environment's value.
GATEWAY_OPTIONS = {
    "host": "--host",
    "port": "--port",
    "cache_dir": "--cache-dir",
    "teacher": "--teacher",
    "keys_file": "--keys-file",
    "budget_tiles": "--budget-tiles",
    "budget_calls": "--budget-calls",
    "weights": "--weights",
    "model_name": "--model-name",
    "model_kwargs": "--model-kwargs",
    "device": "--device",
    "batch_size": "--batch-size",
    "precision": "--precision",
    "input_name": "--input-name",
    "output_name": "--output-name",
    "input_size": "--input-size",
    "resize_size": "--resize-size",
    "interpolation": "--interpolation",
    "mean": "--mean",
    "std": "--std",
    "licence": "--licence",
}


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``unite serve-gateway``; every default is the setting's environment variable or its default."""
    parser.add_argument("--host", default=None, help="address to bind (default: UNITE_GATEWAY_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to bind (default: UNITE_GATEWAY_PORT or 8100)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: UNITE_GATEWAY_CACHE_DIR or ./runs/cache)")
    parser.add_argument(
        "--teacher", default=None, help="teacher backend: reference, remote, uni2-h, timm or onnx (default: UNITE_GATEWAY_TEACHER or 'reference')"
    )
    parser.add_argument(
        "--keys-file", type=Path, default=None, help="TOML file of API keys and quotas (default: UNITE_GATEWAY_KEYS_FILE, or no keys)"
    )
    parser.add_argument(
        "--budget-tiles", type=int, default=None, help="most tiles the teacher may ever be sent (default: UNITE_GATEWAY_BUDGET_TILES, or no limit)"
    )
    parser.add_argument(
        "--budget-calls", type=int, default=None, help="most teacher calls ever (default: UNITE_GATEWAY_BUDGET_CALLS, or no limit)"
    )

    local = parser.add_argument_group("local teachers (uni2-h, timm, onnx)")
    local.add_argument("--weights", type=Path, default=None, help="weights file: safetensors, .bin/.pth, or .onnx (default: UNITE_GATEWAY_WEIGHTS)")
    local.add_argument("--model-name", default=None, help="timm model name of the timm teacher (default: UNITE_GATEWAY_MODEL_NAME)")
    local.add_argument(
        "--model-kwargs", type=json.loads, default=None, help="extra timm.create_model arguments as a JSON object (default: UNITE_GATEWAY_MODEL_KWARGS)"
    )
    local.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: UNITE_GATEWAY_DEVICE or auto)")
    local.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default: UNITE_GATEWAY_BATCH_SIZE or 32)")
    local.add_argument("--precision", default=None, help="bf16 (autocast) or fp32 (default: UNITE_GATEWAY_PRECISION or bf16)")
    local.add_argument("--input-name", default=None, help="ONNX input name, when the model has several (default: UNITE_GATEWAY_INPUT_NAME)")
    local.add_argument("--output-name", default=None, help="ONNX output holding the embedding (default: UNITE_GATEWAY_OUTPUT_NAME)")
    local.add_argument("--input-size", type=int, default=None, help="model input side in pixels (default: UNITE_GATEWAY_INPUT_SIZE or the model's)")
    local.add_argument(
        "--resize-size", type=int, default=None, help="side in pixels before the centre crop (default: UNITE_GATEWAY_RESIZE_SIZE or the model's)"
    )
    local.add_argument("--interpolation", default=None, help="resize interpolation, such as bicubic (default: UNITE_GATEWAY_INTERPOLATION or the model's)")
    local.add_argument("--mean", type=float, nargs=3, default=None, help="RGB mean in [0, 1] (default: UNITE_GATEWAY_MEAN or the model's)")
    local.add_argument("--std", type=float, nargs=3, default=None, help="RGB standard deviation (default: UNITE_GATEWAY_STD or the model's)")
    local.add_argument("--licence", default=None, help="licence and terms of the weights (default: UNITE_GATEWAY_LICENCE)")


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    """Return the gateway settings: the environment's, with the options given on the command line on top."""
    # Imported here, like every service in this command line, so that `unite --help` stays fast.
    from pydantic_settings import SettingsError

    from shared.settings import settings_source_error
    from teacher_gateway.settings import ENV_PREFIX, GatewaySettings

    overrides = {field: getattr(args, option.lstrip("-").replace("-", "_")) for field, option in GATEWAY_OPTIONS.items()}
    try:
        return GatewaySettings(**{field: value for field, value in overrides.items() if value is not None})
    except SettingsError as error:
        raise settings_source_error(error, env_prefix=ENV_PREFIX, service="gateway") from error


def serve_gateway(settings: GatewaySettings) -> int:
    """Open the keys, the teacher, the cache and the ledger, then serve the gateway until it is stopped."""
    import uvicorn

    from shared.cache import EmbeddingCache
    from shared.http import AccessLogQueryFilter
    from teacher_gateway.app import create_app
    from teacher_gateway.auth import KeyStore
    from teacher_gateway.teachers.registry import build_configured_teacher
    from teacher_gateway.usage import UsageLedger

    # uvicorn reports an error in the app's startup as a traceback and exit status 3, so what the startup
    # would open is opened here first, and a bad setting ends the command with its message.
    if settings.keys_file is not None:
        KeyStore.load(settings.keys_file)
    teacher = build_configured_teacher(settings)
    try:
        EmbeddingCache(settings.cache_dir).close()
        UsageLedger(settings.cache_dir).close()
        # The app closes the teacher at shutdown, before the cache, which cancels teacher calls still in flight.
        app = create_app(settings, teacher=teacher, teacher_name=settings.teacher, close_teacher=True)
    except BaseException:
        close = getattr(teacher, "close", None)
        if callable(close):
            close()
        raise
    # After shutdown_grace_s seconds of a shutdown (SIGTERM or SIGINT), uvicorn cancels the requests still running.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=settings.shutdown_grace_s)
    # uvicorn.Config sets up uvicorn's loggers, so the filter goes on after it. The access log stays because it
    # is the gateway's only line per request, but without query strings, where a client may have put its API key.
    logging.getLogger("uvicorn.access").addFilter(AccessLogQueryFilter())
    uvicorn.Server(config).run()
    return 0
