"""The console's gateway app (a real catalog, no engine) serves the usage API's fast tests too."""

from tests.serve.console.conftest import (  # noqa: F401 - the fixtures
    browser_session,
    console,
    console_app,
)
