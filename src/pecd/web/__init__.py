"""The HTTPS side of pecd: one ASGI application (Starlette), served by the web process.

``app.make_app`` builds it; ``pecd.runtime.web_process`` serves it on ``listeners.https``.
"""
