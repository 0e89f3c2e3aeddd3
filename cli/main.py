"""The `crflow` command: the top of the app. It runs the flows against a site file, and asks
the site's target for its status.

    crflow install -c examples/local.yaml
    crflow status -c examples/local.yaml
    crflow export-client -c examples/local.yaml --out ./registry-client
    crflow down -c examples/local.yaml

Exit codes: 0 done (healthy), 1 an error (one line, `crflow: error: ...`), 2 a usage error,
3 unhealthy, 4 not installed. Flows, tasks and Prefect are imported only by the commands
that run a flow: `--help`, `status` and `export-client` answer without them.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import typer

from crflow import runtime
from crflow.config import BACKUP_PASSPHRASE, environment
from crflow.errors import CrflowError, NotInstalled, in_chain
from crflow.files import write_atomic
from crflow.health import Status
from crflow.settings import Site, load_site
from crflow.targets import Stoppable, target_for

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server that records crflow's runs.")
app.add_typer(server_app, name="server")

SiteFile = typer.Option(..., "--config", "-c", help="The site file (YAML), e.g. examples/local.yaml.")


# CrflowError, and ConnectionError: what crflow raises for "not answering" (NotAnswering) and
# retries; once the retries are spent, its message is the whole story.
ONE_LINE_ERRORS = (CrflowError, ConnectionError)


class _OneLineErrors(logging.Filter):
    """Prefect prints a failed run's traceback; for a CrflowError its one-line message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ONE_LINE_ERRORS):
            record.exc_info = record.exc_text = None  # Prefect's message already names the error
        return True


def _quiet_tracebacks() -> None:
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(_OneLineErrors())


def _run_flow(flow, site: Site, site_file: Path, *parameters):
    """Run a flow against `site_file` (already read as `site`) in this process, reporting to
    crflow's Prefect server."""
    runtime.ensure_server()
    import prefect.logging.configuration  # noqa: F401  (sets up Prefect's handlers, then we filter them)
    from prefect import tags
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from crflow.flows.site_lock import site_tag

    _quiet_tracebacks()
    typer.secho(f"Prefect UI: {runtime.ui_url()}", err=True, dim=True)
    # The site lease's renewer sends this run's heartbeats (every 20 s); Prefect's own thread
    # would hold up the end of every command by up to a second. The site's tag is on the run
    # from its creation, so every event of it (Failed included) reaches the site's alerts.
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), tags("crflow", site_tag(site)):
            return flow(str(site_file.resolve()), *parameters)
    finally:
        _send_what_prefect_holds()


def _send_what_prefect_holds() -> None:
    """Send the run's last events and log lines now, so Prefect's own notes on doing so come
    before crflow's last line (the error, when there is one), not after it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=60)


@app.command()
def install(
    config: Path = SiteFile,
    new_ca: bool = typer.Option(False, "--new-ca", help="Replace the site's CA: every client and node must trust "
                                "the new one (asks first)."),
    yes: bool = typer.Option(False, "--yes", help="With --new-ca: do not ask for confirmation."),
) -> None:
    """Install the registry described by the site file, or bring it back to that state."""
    from crflow.chart import chart_reference
    from crflow.flows.install import install as install_flow
    from crflow.oci import SMOKE_REPO

    site = load_site(config)
    if new_ca:
        _confirm(yes, f"crflow install --new-ca makes a new CA for {site.release}: every client and node that "
                      "trusts the current one must be given the new one (the old one's records stay). Go ahead?", "crflow install --new-ca")
    url = _run_flow(install_flow, site, config, new_ca)
    client = target_for(site).bundle
    typer.echo(f"Registry ready at {url}")
    typer.echo(f"  client files: crflow export-client -c {config} --out DIR   (CA and login for skopeo/podman/docker)")
    typer.echo(f"  try: skopeo inspect --authfile {client}/auth.json --cert-dir {client} docker://{site.registry.server}/{SMOKE_REPO}:install")
    typer.echo(f"  chart: helm pull {chart_reference(site.registry.server)} --ca-file {client}/ca.crt "
               f"--registry-config {client}/auth.json")


@app.command()
def verify(
    config: Path = SiteFile,
    source_image: str = typer.Option(None, help="Also copy this image (host/repo:tag, index and all) and check it."),
    source_ca: Path = typer.Option(None, help="CA file of the source registry (default: the system's)."),
    source_authfile: Path = typer.Option(None, help="auth.json with a login for the source registry."),
) -> None:
    """Push a new image, pull it back, check the catalog and where the data landed, delete it."""
    from crflow.flows.verify import verify as verify_flow

    site = load_site(config)
    extra = [str(p.resolve()) if isinstance(p, Path) else p for p in (source_image, source_ca, source_authfile)]
    typer.echo(_run_flow(verify_flow, site, config, *extra))


@app.command()
def upgrade(
    config: Path = SiteFile,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change (the diff artifact), change nothing."),
) -> None:
    """Upgrade the registry to the site file and helm_chart/: diff, upgrade, verify, roll back if it breaks."""
    from crflow.flows.upgrade import upgrade as upgrade_flow

    typer.echo(_run_flow(upgrade_flow, load_site(config), config, dry_run))


@app.command("rotate-credentials")
def rotate_credentials(
    config: Path = SiteFile,
    grace: int = typer.Option(None, "--grace", min=0, help="Seconds both logins work after consumers have the new "
                              "one (default: rotation.grace_seconds)."),
    renew_cert_within: int = typer.Option(None, "--renew-cert-within", min=0, metavar="DAYS",
                                          help="Also renew the server certificate if it expires within DAYS."),
) -> None:
    """Rotate the registry login (new user and password) with no failed pull, and hand it to every consumer."""
    from crflow.flows.rotate import rotate_credentials as rotate_flow

    generation = _run_flow(rotate_flow, load_site(config), config, grace, renew_cert_within)
    typer.echo(f"Login rotated to generation {generation}: client files (and pull Secrets) hold the new one")


@app.command("rotate-cert")
def rotate_cert(config: Path = SiteFile) -> None:
    """Renew the server certificate from the same CA and roll the registry onto it."""
    from crflow.flows.rotate import rotate_cert as rotate_flow

    typer.echo(f"Server certificate renewed: {_run_flow(rotate_flow, load_site(config), config)}")


@app.command()
def deploy(
    config: Path = SiteFile,
    pool: str = typer.Option("crflow", "--pool", help="The work pool (made if missing)."),
    pool_type: str = typer.Option("process", "--pool-type",
                                  help="process: a worker on this machine; kubernetes: each run a Job in the cluster."),
    job_template: Path = typer.Option(None, "--job-template",
                                      help="The kubernetes pool's base job template (default: the one crflow ships)."),
    image: str = typer.Option(None, "--image", help="The flow image the kubernetes pool's Jobs run."),
    remove: bool = typer.Option(False, "--remove", help="Delete this site's deployments and automations."),
) -> None:
    """Register this site's deployments (install, verify, rotations, upgrade) and alerts on the Prefect server."""
    from crflow.flows.deployments import deploy_site, remove_site
    from crflow.resources import packaged

    site = load_site(config)
    runtime.ensure_server()
    if remove:
        deployments, automations = remove_site(site)
        typer.echo(f"Removed {deployments} deployments and {automations} automations of {site.registry.server}")
        return
    if pool_type not in ("process", "kubernetes"):
        raise CrflowError(f"--pool-type {pool_type}: use process or kubernetes")
    done = deploy_site(site, config, pool, pool_type, job_template, image)
    runtime.register_site(config)
    typer.echo(f"Deployed to {pool_type} work pool {done.pool}, bound to {done.site_file}:")
    for line in done.deployments:
        typer.echo(f"  {line}")
    typer.echo(f"Alerts: {done.automations} automations" if done.automations else
               "Alerts: none (set alerts.webhook or alerts.block in the site file)")
    if pool_type == "kubernetes":
        typer.echo(f"Each run is a Job in the cluster. Give it the site file and the result key, once:\n"
                   f"  kubectl -n crflow create configmap crflow-sites --from-file={done.site_file}={config.resolve()}\n"
                   f"  kubectl -n crflow create secret generic crflow-result-key --from-file=result.key=RESULT_KEY_FILE\n"
                   f"and run the worker: kubectl apply -f {packaged('deployments', 'worker.yaml')}   "
                   f"(UI: {runtime.ui_url()})")
        return
    auth = f"PREFECT_API_AUTH_STRING=$(cat {runtime.auth_file()}) " if environment().own_prefect else ""
    typer.echo(f"Start a worker: {auth}prefect worker start --pool {done.pool}   (UI: {runtime.ui_url()})")


@app.command()
def gc(
    config: Path = SiteFile,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what retention and the collection would delete."),
) -> None:
    """Apply retention, then collect unreferenced blobs in a read-only window (pulls keep working)."""
    from crflow.flows.gc import gc as gc_flow

    typer.echo(_run_flow(gc_flow, load_site(config), config, dry_run))


@app.command()
def uninstall(
    config: Path = SiteFile,
    purge: bool = typer.Option(False, "--purge", help="Also the stored images, the CA and the logins, for good."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Remove the registry, its node-trust files and the pull Secrets crflow made; keep images, CA and logins."""
    from crflow.flows.uninstall import removal_plan
    from crflow.flows.uninstall import uninstall as uninstall_flow

    site = load_site(config)
    typer.echo(f"crflow uninstall will remove, for registry {site.release}:")
    for what in removal_plan(site, purge):
        typer.echo(f"  - {what}")
    _confirm(yes, "Go ahead?", "crflow uninstall")
    done = _run_flow(uninstall_flow, site, config, purge)
    for line in done.removed:
        typer.echo(f"removed: {line}")
    for line in done.kept:
        typer.echo(f"kept: {line}")


def _confirm(yes: bool, question: str, command: str) -> None:
    """Go on only if `yes`, or a person at a terminal says so (never guessed without one)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CrflowError(f"{command} asks before it goes on: run it in a terminal, or add --yes")
    typer.confirm(question, abort=True)


@app.command()
def down(config: Path = SiteFile) -> None:
    """Stop the local registry (its data, certificates and credentials stay)."""
    target = target_for(load_site(config))
    if not isinstance(target, Stoppable):
        raise CrflowError("crflow down stops the local target's registry; on Kubernetes use helm uninstall")
    stopped = target.down()
    typer.echo("Registry stopped" if stopped else "Registry was not running")


@app.command()
def status(config: Path = SiteFile) -> None:
    """Is the registry running, and does it accept crflow's login over TLS? (exit 3 if not, 4 if never installed)"""
    health = target_for(load_site(config)).status()
    typer.echo(health.detail)
    runtime.configure()
    typer.echo(f"Prefect UI: {runtime.ui_url()} ({'up' if runtime.healthy() else 'not running'})")
    if health.status is not Status.HEALTHY:
        typer.secho(f"crflow: {health.status.name.lower().replace('_', ' ')}", err=True, fg="red")
        raise typer.Exit(int(health.status))


@app.command("export-client")
def export_client(config: Path = SiteFile, out: Path = typer.Option(..., "--out", help="Directory to write.")) -> None:
    """Write DIR/ca.crt and DIR/auth.json (0600): what skopeo, podman or docker need."""
    site = load_site(config)
    bundle = target_for(site).client_bundle()  # on a cluster with none here: from its CA and login Secrets
    for name, mode in (("ca.crt", 0o644), ("auth.json", 0o600)):
        write_atomic(out / name, (bundle / name).read_bytes(), mode, make_parents=0o700)
    write_atomic(out / "README.txt", client_readme(site).encode(), 0o644)
    typer.echo(f"Wrote {out}/ca.crt, {out}/auth.json and {out}/README.txt for {', '.join(site.registry.servers)}")
    typer.echo(f"  skopeo ... --authfile {out}/auth.json --cert-dir {out}")
    typer.echo(f"  trust it on a machine: crflow trust -c {config} --runtime containerd|docker|containers|system")


def client_readme(site: Site) -> str:
    """How a person trusts the CA where crflow does not run: Windows and WSL too."""
    first, release = site.registry.servers[0], site.release
    lines = [f"Registry {release}: {', '.join(site.registry.servers)}", "",
             "ca.crt     the registry's CA: trust it, and every address above is trusted",
             "auth.json  the login (keep it private), for skopeo/podman/buildah --authfile, or docker's config.json", "",
             "Linux, with crflow:  crflow trust -c SITE.yaml --runtime containerd|docker|containers|system",
             "Linux, by hand, for each address HOST:PORT above:",
             "  docker:          /etc/docker/certs.d/HOST:PORT/ca.crt",
             "  podman, skopeo:  /etc/containers/certs.d/HOST:PORT/ca.crt",
             "  containerd:      /etc/containerd/certs.d/HOST:PORT/ (ca.crt and a hosts.toml naming it)", "",
             "Windows (PowerShell as Administrator; Docker Desktop reads this store):",
             "  Import-Certificate -FilePath .\\ca.crt -CertStoreLocation Cert:\\LocalMachine\\Root", "",
             "WSL (Debian, Ubuntu):",
             f"  sudo cp ca.crt /usr/local/share/ca-certificates/crflow-{release}.crt && sudo update-ca-certificates", "",
             f"Check: curl --cacert ca.crt -u USER https://{first}/v2/_catalog", ""]
    return "\n".join(lines)


@app.command("trust")
def trust_command(
    config: Path = SiteFile,
    runtime_name: str = typer.Option(..., "--runtime", metavar="containerd|docker|containers|system",
                                     help="Whose trust: containerd's certs.d, docker's, podman/skopeo/buildah's "
                                          "(containers), or the system's CA bundle."),
    root: Path = typer.Option(Path("/"), "--root", help="Write under this directory instead of / (as a chroot)."),
    remove: bool = typer.Option(False, "--remove", help="Undo exactly what crflow trust wrote, nothing else."),
) -> None:
    """Make this machine's container runtime trust the registry's CA, for every address (no restart)."""
    from crflow.trust import trust

    lines = trust(load_site(config), runtime_name, root, remove)
    for line in lines or ["nothing to remove" if remove else "nothing to change"]:
        typer.echo(line)


def _passphrase(confirm: bool) -> str:
    """From the environment, else asked for (never an argument: it would sit in shell history)."""
    if passphrase := environment().backup_passphrase:
        return passphrase.get_secret_value()
    if not sys.stdin.isatty():
        raise CrflowError(f"no passphrase: set {BACKUP_PASSPHRASE} or run this in a terminal to be asked")
    return typer.prompt("Backup passphrase", hide_input=True, confirmation_prompt=confirm)


@app.command()
def backup(config: Path = SiteFile, out: Path = typer.Option(..., "--out", help="The backup file to write (0600).")) -> None:
    """Write one encrypted file with what the site cannot be rebuilt without: CA, logins, generations, record."""
    from crflow.backup import site_identity, write_backup

    site = load_site(config)
    held = write_backup(site.state_dir, out, _passphrase(confirm=True), site.result_key, site_identity(site))
    typer.echo(f"Wrote {out}: {', '.join(held)} (stored images stay where they are; keep the passphrase apart)")


@app.command()
def restore(config: Path = SiteFile, backup_file: Path = typer.Argument(..., metavar="FILE")) -> None:
    """Bring a site's CA, logins and generations back from a backup, into an empty state_dir."""
    from crflow.backup import restore_backup, site_identity

    site = load_site(config)
    restored = restore_backup(site.state_dir, backup_file, _passphrase(confirm=False), site_identity(site))
    typer.echo(f"Restored {', '.join(restored)} into {site.state_dir}; now run crflow install -c {config}")


@app.command()
def doctor(
    config: Path = typer.Option(None, "--config", "-c", help="Also check what this site needs (target, state_dir, "
                                "ports, disk)."),
    fix: bool = typer.Option(False, "--fix", help="Fetch the pinned helm into crflow's data folder if none is found."),
) -> None:
    """Check what crflow needs on this machine, a line per check with its fix; exit 0 if a site can be installed."""
    from crflow.cli.doctor import Level, examine

    findings = examine(load_site(config) if config else None, fix=fix)
    for finding in findings:
        typer.echo(finding.line())
    failed = [f.check for f in findings if f.level is Level.FAIL]
    if failed:
        typer.secho(f"crflow: error: {len(failed)} check(s) failed: {', '.join(failed)}", err=True, fg="red")
        raise typer.Exit(1)


def _show_version(shown: bool) -> None:
    if shown:
        from crflow.cli.doctor import versions

        typer.echo(versions())
        raise typer.Exit()


_debug = False  # --debug: an error's traceback, causes included, before its one line


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="crflow's version, and those of the helm, Prefect and distribution it found."),
    debug: bool = typer.Option(False, "--debug", help="On an error, print its traceback (with its causes) too."),
) -> None:
    """A private container registry on your own Kubernetes cluster (or this machine), run by Prefect flows."""
    global _debug
    _debug = debug


@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server (the flows start it themselves when needed)."""
    runtime.ensure_server()
    typer.echo(f"Prefect UI: {runtime.ui_url()}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server crflow started."""
    typer.echo("Prefect server stopped" if runtime.stop_server() else "Prefect server was not running")


def _end_on_sigterm(signum, frame) -> None:
    """SIGTERM ends crflow: SystemExit lets Prefect mark the run Crashed on its way out, and a
    timer ends the process anyway if that way out is blocked (every step is safe to rerun)."""
    backstop = threading.Timer(4, os._exit, (128 + signum,))
    backstop.daemon = True
    backstop.start()
    raise SystemExit(128 + signum)


class OutputClosed(Exception):
    """Whoever read crflow's output stopped reading (click would turn the broken pipe into a silent exit 1)."""


class _PipeAware:
    """sys.stdout, whose broken pipe ends crflow with one line instead of silence."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _closed(self):
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())  # nothing more, not even at exit
        raise OutputClosed from None

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()

    def flush(self):
        try:
            return self._stream.flush()
        except BrokenPipeError:
            self._closed()


def _traceback(err: BaseException) -> None:
    if _debug:
        traceback.print_exception(err, file=sys.stderr)


def _run_app() -> None:
    """Typer handles usage errors, --help and exit codes, and ends with SystemExit. A SIGTERM
    that lands where Prefect cannot turn it into a crash (its own set-up of a run) leaves an
    error of Prefect's whose chain holds the signal: crflow still ends as SIGTERM asked."""
    try:
        app()
    except Exception as err:
        from prefect.exceptions import TerminationSignal

        if in_chain(err, TerminationSignal) is not None:
            raise SystemExit(128 + signal.SIGTERM) from err
        raise


def main() -> None:
    os.umask(0o077)  # what crflow writes (Prefect's result files too) is its user's only
    sys.stdout = _PipeAware(sys.stdout)
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    try:
        runtime.configure()  # before anything imports prefect: its settings are read once, at import
        _run_app()
    except OutputClosed:  # the reader went away (| head): say so once, with nothing more to stdout
        typer.secho("crflow: error: the output was closed before crflow finished writing it (broken pipe)", err=True,
                    fg="red")
        sys.exit(128 + signal.SIGPIPE)
    except NotInstalled as err:
        _traceback(err)
        typer.secho(f"crflow: error: {err}", err=True, fg="red")
        sys.exit(int(Status.NOT_INSTALLED))
    except ONE_LINE_ERRORS as err:
        _traceback(err)
        typer.secho(f"crflow: error: {err}", err=True, fg="red")
        sys.exit(1)
    except OSError as err:  # the machine's, not crflow's: a full disk, a busy mount, a file it cannot reach
        _traceback(err)
        where = f": {err.filename}" if err.filename else ""
        why = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror or str(err)
        typer.secho(f"crflow: error: {why}{where}", err=True, fg="red")
        sys.exit(1)
    except Exception as err:  # not ours: say what and where to look, still one line
        _traceback(err)
        typer.secho(f"crflow: error: {type(err).__name__}: {err} (crflow --debug ... shows where)", err=True, fg="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
