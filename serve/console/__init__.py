"""The web console at `/console`: deployments, adapter versions, rollouts, A/B tests, drift and
(admin) engines, read and acted on through the gateway's own API.

- `routes`   the pages and actions (`install_console`)
- `api`      `ConsoleAPI`: the gateway's own HTTP API, called with the signed-in key
- `session`  sealed HTTP-only session cookies and CSRF tokens
- `charts`   inline SVG charts; `formats` numbers and times as the pages show them
- `templates/`, `static/`   Jinja2 pages; htmx and the stylesheet (no CDN)
"""

from lorafleet.serve.console.routes import install_console

__all__ = ["install_console"]
