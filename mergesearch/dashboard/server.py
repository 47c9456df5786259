"""`mergesearch dashboard`: optuna-dashboard's WSGI app on a study's storage, our pages mounted
under ``/mergesearch/``, served by the standard library's threaded WSGI server (what
optuna-dashboard's own command uses).

Before serving: the study must exist (else the error lists those that do), the port must be
free (else the error names a free one), and the figures and notes are saved into the study so
optuna-dashboard shows them (``publish=False`` skips that; a storage that refuses writes only
costs a warning). While serving, the saved figures are refreshed when trials finish.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import quote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mergesearch.errors import ConfigError, MergeSearchError, UnknownNameError, suggest

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8080


class DashboardError(ConfigError):
    """The dashboard cannot start: no such study, a port in use, a host that cannot be bound."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Which study


def resolve_target(study_file: Path | None, storage: str | None, name: str | None) -> tuple[str, str | None]:
    """(storage URL, study name or None) from a study file or ``--storage``/``--study``."""
    if study_file is not None:
        from mergesearch.driver.config import load_study
        from mergesearch.driver.storage import default_storage_url

        sf = load_study(study_file)
        return sf.config.storage or default_storage_url(sf.output_dir), name or sf.config.name
    if storage is None:
        raise ConfigError("Give a study file (mergesearch dashboard STUDY.yaml) or --storage URL [--study NAME].")
    return storage, name


def open_study(url: str, name: str | None) -> tuple[Any, str]:
    """The opened storage and the study to show; a clear error listing the studies there when the
    name is unknown, or when none is given and the storage holds several."""
    from mergesearch.driver.report import (
        BASELINES_SUFFIX,
        StorageOpenError,
        _open,
        _safe_url,
    )

    storage = _open(url)
    names = [s.study_name for s in storage.get_all_studies()]
    where = _safe_url(url)
    if not names:
        raise StorageOpenError(f"Storage {where!r} holds no study yet. Run one with `mergesearch run STUDY.yaml`.")
    if name is None:
        main = [n for n in names if not (n.endswith(BASELINES_SUFFIX) and n[: -len(BASELINES_SUFFIX)] in names)]
        if len(main) != 1:
            raise DashboardError(f"Storage {where!r} holds several studies: {', '.join(main)}. "
                                 "Pick one with --study NAME.")
        name = main[0]
    if name not in names:
        close = suggest(name, names)
        hint = close if close.startswith(" Did you mean") else ""
        raise UnknownNameError(f"No study {name!r} in storage {where!r}.{hint} The studies there: {', '.join(sorted(names))}.")
    return storage, name


# ---------------------------------------------------------------------------------------------
# The port


def _free_port(host: str, start: int) -> int | None:
    for port in range(start, min(start + 50, 65536)):
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, port))
            return port
        except OSError:
            continue
    return None


def bind(host: str, port: int) -> WSGIServer:
    """A threaded WSGI server bound to host:port (port 0: any free port), or a DashboardError."""
    cls = _V6Server if ":" in host else _Server
    try:
        return make_server(host, port, _placeholder, server_class=cls, handler_class=_QuietHandler)
    except socket.gaierror as err:
        raise DashboardError(f"Cannot bind the dashboard to host {host!r}: {err.strerror or err}. Use an address "
                             "of this machine, e.g. --host 127.0.0.1 (the default) or --host 0.0.0.0.") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            free = _free_port(host, port + 1) if port else None
            fix = f" Port {free} is free: add --port {free}." if free else " Pick another with --port N."
            raise DashboardError(f"Port {port} on {host} is already in use (another dashboard or server?).{fix}") \
                from None
        if err.errno == errno.EACCES:
            raise DashboardError(f"Not allowed to listen on port {port} of {host} (ports below 1024 need root); "
                                 f"use --port {DEFAULT_PORT} or another above 1023.") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise DashboardError(f"{host!r} is not an address of this machine; use --host 127.0.0.1 (the default) or "
                                 "--host 0.0.0.0 (every interface).") from None
        raise DashboardError(f"Cannot listen on {host}:{port}: {err.strerror or err}.") from None


def _placeholder(environ: Any, start_response: Any) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]


# ---------------------------------------------------------------------------------------------
# The app


def build_app(storage: Any, top: int = 3) -> Any:
    """optuna-dashboard's Bottle app on ``storage`` with our routes under /mergesearch/."""
    import optuna
    import optuna_dashboard
    from bottle import HTTPResponse, response

    from mergesearch.dashboard import pages
    from mergesearch.dashboard.figures import collect, plan_curves
    from mergesearch.driver.report import leaderboard

    app = optuna_dashboard.wsgi(storage)

    def html(text: str, status: int = 200) -> HTTPResponse:
        return HTTPResponse(text, status=status, headers={"Content-Type": "text/html; charset=utf-8"})

    def load(name: str) -> Any:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None

    def dashboard_url(name: str) -> str | None:
        try:
            return f"/dashboard/studies/{storage.get_study_id_from_name(name)}"
        except KeyError:
            return None

    def missing(name: str) -> HTTPResponse:
        names = ", ".join(s.study_name for s in storage.get_all_studies())
        return html(pages.not_found_page(f"No study {name!r} in this storage; the studies there: {names}."), 404)

    @app.get("/mergesearch")
    def studies() -> Any:
        entries = [(s.study_name, s.n_trials, s._study_id) for s in storage.get_all_studies()]
        return html(pages.studies_page(entries))

    @app.get("/mergesearch/static/plotly.min.js")
    def plotly_js() -> Any:
        from plotly.offline import get_plotlyjs

        response.set_header("Content-Type", "application/javascript; charset=utf-8")
        response.set_header("Cache-Control", "max-age=86400")
        return get_plotlyjs()

    @app.get("/mergesearch/studies/<name>")
    def study_view(name: str) -> Any:
        study = load(name)
        if study is None:
            return missing(name)
        return html(pages.overview_page(collect(study, top=top), dashboard_url(name)))

    @app.get("/mergesearch/studies/<name>/trials/<number:int>")
    def trial_view(name: str, number: int) -> Any:
        study = load(name)
        if study is None:
            return missing(name)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        if number not in trials:
            return html(pages.not_found_page(f"Study {name!r} has no trial {number} (it has {len(trials)} trials)."),
                        404)
        t = trials[number]
        lb = leaderboard(study, top=None)
        row = next((r for r in (*lb.rows, *lb.pruned, *lb.failed, *lb.baselines)
                    if r.number == number and r.study == name), None)
        curves, why = None, ""
        plan = t.user_attrs.get("plan")
        if plan:
            try:
                curves = plan_curves(plan, number, t.user_attrs.get("label") or f"trial {number}")
            except MergeSearchError as err:
                why = str(err).splitlines()[0]
        else:
            why = "the trial has no merge plan yet"
        url = dashboard_url(name)
        return html(pages.trial_page_html(name, number, t.user_attrs, t.state.name.lower(), row, lb, curves, why,
                                          f"{url}/trials?numbers={number}" if url else None))

    return app


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class Running:
    """A started dashboard: its server (``serve_forever`` it) and the URLs it serves."""

    server: WSGIServer
    study_name: str
    base_url: str
    dashboard_url: str
    mergesearch_url: str
    stop_refresh: threading.Event

    def shutdown(self) -> None:
        self.stop_refresh.set()
        self.server.shutdown()
        self.server.server_close()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def start(url: str, name: str | None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, top: int = 3,
          publish: bool = True, refresh_s: float = 30.0, log: Callable[[str], None] = print,
          warn: Callable[[str], None] | None = None) -> Running:
    """Check the study and the port, save the figures into the study, and return the bound server
    (not serving yet). ``refresh_s`` > 0: re-save the figures when trials finish, checked that often."""
    from mergesearch.dashboard import require

    require()
    import optuna

    warn = warn or log
    storage, name = open_study(url, name)
    server = bind(host, port)
    try:
        app = build_app(storage, top)
        server.set_app(app)
        study = optuna.load_study(study_name=name, storage=storage)
        stop = threading.Event()
        if publish:
            save_figures(study, top, log, warn)
            if refresh_s > 0:
                threading.Thread(target=_refresh_loop, args=(study, top, refresh_s, stop, warn),
                                 name="mergesearch-dashboard-refresh", daemon=True).start()
        bound = server.server_address[1]
        base = f"http://{_url_host(host)}:{bound}"
        sid = storage.get_study_id_from_name(name)
        return Running(server, name, base, f"{base}/dashboard/studies/{sid}",
                       f"{base}/mergesearch/studies/{quote(name, safe='')}", stop)
    except BaseException:
        server.server_close()
        raise


def save_figures(study: Any, top: int, log: Callable[[str], None], warn: Callable[[str], None]) -> bool:
    """Publish our figures and notes into ``study`` for optuna-dashboard; a failure is warned, not raised."""
    from mergesearch.dashboard.publish import publish

    try:
        out = publish(study, top=top, log=log)
    except Exception as err:  # noqa: BLE001 - a read-only or busy storage must not stop the dashboard
        warn(f"could not save the figures into the study ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
             "optuna-dashboard will not show them, the mergesearch pages still do")
        return False
    log(f"saved {len(out.figures)} figures and {int(out.study_note) + len(out.trial_notes)} notes into study "
        f"{study.study_name} (shown on its optuna-dashboard page)")
    return True


def _refresh_loop(study: Any, top: int, every_s: float, stop: threading.Event, warn: Callable[[str], None]) -> None:
    from mergesearch.dashboard.publish import publish, signature

    try:
        last = signature(study)
    except Exception:  # noqa: BLE001 - the loop below says why if it keeps failing
        last = None
    while not stop.wait(every_s):
        try:
            sig = signature(study)
            if sig != last:
                publish(study, top=top)
                last = sig
        except Exception as err:  # noqa: BLE001 - keep serving; say why once
            warn(f"refreshing the saved figures failed: {str(err).splitlines()[0][:200]}; they are no longer "
                 "refreshed (the mergesearch pages stay live)")
            return


def dashboard_command(study_file: Path | None, storage: str | None, name: str | None, *, host: str, port: int,
                      top: int, publish: bool, refresh_s: float, console: Any, err_console: Any) -> None:
    """`mergesearch dashboard`: resolve the study, start, print the URLs, serve until Ctrl-C."""
    from rich.markup import escape

    url, name = resolve_target(study_file, storage, name)

    def log(msg: str) -> None:
        console.print(escape(msg), highlight=False, soft_wrap=True)

    def warn(msg: str) -> None:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(msg)}", highlight=False, soft_wrap=True)

    if host not in LOOPBACK:
        warn(f"serving on {host}, not only this machine: optuna-dashboard has no login, so anyone who can reach "
             "this port can read the study and edit or delete it. Prefer the default (127.0.0.1) and an SSH tunnel "
             f"(ssh -L {port or DEFAULT_PORT}:127.0.0.1:{port or DEFAULT_PORT} THIS_HOST).")
    running = start(url, name, host=host, port=port, top=top, publish=publish, refresh_s=refresh_s, log=log,
                    warn=warn)
    log(f"optuna-dashboard:  {running.dashboard_url}")
    log(f"mergesearch views: {running.mergesearch_url}")
    log("Ctrl-C to stop.")
    try:
        running.server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        running.stop_refresh.set()
        running.server.server_close()
