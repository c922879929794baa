"""`ovss serve`: a local web page to segment your own images with any registered method.

The handlers (app.py) are plain Python and need no web framework; the page itself (server.py) needs the
`web` extra (Gradio): `pip install 'ovss[web]'`.
"""
from ovss.serve.app import MethodView, RunRequest, RunResult, ServeApp, ServeConfig, ServeError

__all__ = ["MethodView", "RunRequest", "RunResult", "ServeApp", "ServeConfig", "ServeError"]
