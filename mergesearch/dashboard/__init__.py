"""`mergesearch dashboard`: optuna-dashboard on a study's storage, plus the views it lacks.

* :mod:`mergesearch.dashboard.figures` builds plotly figures from a study (pure functions): the
  per-layer parameter curves of a trial (from the same resolution as ``mergesearch explain``),
  per-task scores per trial, proxy vs held-out with the gap, the Pareto front of a per-task
  study, and the trial timeline per worker.
* :mod:`mergesearch.dashboard.publish` saves them into the study through optuna-dashboard's
  extension points (plotly graph objects on the study page, Markdown notes on the study and its
  best trials), so they show in optuna-dashboard's own UI.
* :mod:`mergesearch.dashboard.server` serves optuna-dashboard's WSGI app with a few pages of our
  own mounted under ``/mergesearch/`` (the per-trial curves, which optuna-dashboard has no place
  for), bound to 127.0.0.1 unless told otherwise.

Needs the ``dashboard`` extra (optuna-dashboard, plotly); nothing here is imported by the CLI
until the command runs.
"""

from __future__ import annotations

INSTALL_HINT = 'pip install -c constraints.txt -e ".[dashboard]"'


def require() -> None:
    """Raise a ConfigError naming the install command if optuna-dashboard or plotly is missing."""
    import importlib.util

    from mergesearch.errors import ConfigError

    missing = [m for m, mod in (("optuna-dashboard", "optuna_dashboard"), ("plotly", "plotly"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(f"`mergesearch dashboard` needs {' and '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")
