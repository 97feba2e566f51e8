"""The web console at `/console`: deployments, adapter versions, rollouts, A/B tests, drift and
(admin) engines, read and acted on through the gateway's own API."""

from lorafleet.serve.console.routes import install_console

__all__ = ["install_console"]
