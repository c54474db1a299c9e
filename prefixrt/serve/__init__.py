"""``prefixrt serve``: an OpenAI-compatible HTTP server over :class:`prefixrt.Engine`, the prefix as the model name.

* :mod:`prefixrt.serve.app` -- the FastAPI app (routes, error handlers, API key);
* :mod:`prefixrt.serve.handlers` -- what the routes do (admission, streaming, disconnects, prefix updates);
* :mod:`prefixrt.serve.state` -- the configuration and state one app serves;
* :mod:`prefixrt.serve.engine_loop` -- the one thread that steps the engine, and its thread-safe queue;
* :mod:`prefixrt.serve.protocol` -- the request bodies, field by field (unsupported fields are refused);
* :mod:`prefixrt.serve.text` -- incremental detokenization and stop strings;
* :mod:`prefixrt.serve.metrics` -- Prometheus metrics in the app's own registry;
* :mod:`prefixrt.serve.prefixes` -- loading prefixes at run time, from under ``--prefix-dir`` only;
* :mod:`prefixrt.serve.hf_loop` -- the benchmark's baseline executor (HF ``generate()`` per request);
* :mod:`prefixrt.serve.bench` -- the load generator of ``prefixrt bench serve``.

The command line (``prefixrt serve``) builds the model, the bank and the engine (:mod:`prefixrt.commands.serve`).
"""

from prefixrt.serve.app import create_app
from prefixrt.serve.engine_loop import EngineLoop
from prefixrt.serve.state import ServeConfig, ServeState

__all__ = ["EngineLoop", "ServeConfig", "ServeState", "create_app"]
