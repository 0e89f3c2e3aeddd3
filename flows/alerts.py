"""Alerts that reach a person: the events crflow's flows emit, and the Prefect automations
that turn them (and failed runs) into notifications.

The flows emit two events of their own, about the site as a resource (`crflow.site.NAME`):
- `crflow.certificate.expiring` from verify, when the served certificate or the CA has
  fewer days left than `alerts.cert_days` (the days are in the payload);
- `crflow.rotation.rolled-back` from rotate-credentials, when a rotation was undone.

`crflow deploy` creates one automation for each, and one for any run of the site that ends
Failed or Crashed, all sending to the same notification block: a webhook block crflow keeps
(the URL, which often holds a token, goes into the block's secrets), or one the user made.
No notification holds a secret: they carry names, states, error lines and days.
"""

from __future__ import annotations

import contextlib

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_UI_URL

from crflow.errors import CrflowError
from crflow.flows.site_lock import site_name, site_slug, site_tag
from crflow.settings import Site

CERT_EXPIRING = "crflow.certificate.expiring"
ROTATION_ROLLED_BACK = "crflow.rotation.rolled-back"
RUN_ENDED_BADLY = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")


def _resource(site: Site) -> dict[str, str]:
    return {"prefect.resource.id": f"crflow.site.{site_name(site)}", "prefect.resource.name": site_name(site)}


def _tag(site: Site) -> dict[str, str]:
    return {"prefect.resource.id": f"prefect.tag.{site_tag(site)}", "prefect.resource.role": "tag"}


def emit_certificate_days(site: Site, server_days: int | None, ca_days: int | None) -> None:
    """The expiring event, when the server certificate or the CA has fewer than alerts.cert_days left."""
    known = [d for d in (server_days, ca_days) if d is not None]
    if known and min(known) < site.alerts.cert_days:
        emit_event(CERT_EXPIRING, resource=_resource(site), related=[_tag(site)],
                   payload={"server_cert_days": server_days, "ca_days": ca_days, "threshold": site.alerts.cert_days})


def emit_rotation_rolled_back(site: Site, generation: int, reason: str) -> None:
    emit_event(ROTATION_ROLLED_BACK, resource=_resource(site), related=[_tag(site)],
               payload={"generation": generation, "reason": reason[:300]})


def automation_prefix(site: Site) -> str:
    return f"crflow {site_name(site)}: "


def automations(site: Site, block_id) -> list[Automation]:
    """The site's three automations, all notifying through the block `block_id`."""
    name, prefix = site_name(site), automation_prefix(site)
    this_site = {"prefect.resource.id": _resource(site)["prefect.resource.id"]}
    ui = (PREFECT_UI_URL.value() or "").rstrip("/")  # the server's own ui_url filter is empty unless it was told

    def notify(subject: str, body: str) -> list[SendNotification]:
        return [SendNotification(block_document_id=block_id, subject=subject, body=body)]

    def on(events, match: dict, related: dict | None = None) -> EventTrigger:
        return EventTrigger(expect=set(events), match=match, match_related=related or {},
                            posture=Posture.Reactive, threshold=1, within=0)

    return [
        Automation(
            name=prefix + "a run failed", description=f"Any crflow run of {name} that ends Failed or Crashed.",
            trigger=on(RUN_ENDED_BADLY, {"prefect.resource.id": "prefect.flow-run.*"}, _tag(site)),
            actions=notify(f"crflow {name}: {{{{ flow.name }}}} {{{{ flow_run.state.name }}}}",
                           f"site: {name}\nflow: {{{{ flow.name }}}}\nrun: {{{{ flow_run.name }}}} "
                           f"({ui}/runs/flow-run/{{{{ flow_run.id }}}})\nstate: {{{{ flow_run.state.name }}}}\n"
                           "failed: {{ flow_run.state.message }}")),
        Automation(
            name=prefix + "a rotation rolled back", description=f"A login rotation of {name} was undone.",
            trigger=on([ROTATION_ROLLED_BACK], this_site),
            actions=notify(f"crflow {name}: a login rotation was rolled back",
                           f"site: {name}\nflow: rotate-credentials\nrolled back to generation "
                           "{{ event.payload.generation }}: {{ event.payload.reason }}")),
        Automation(
            name=prefix + "a certificate ends soon",
            description=f"verify found a certificate of {name} with fewer than {site.alerts.cert_days} days left.",
            trigger=on([CERT_EXPIRING], this_site),
            actions=notify(f"crflow {name}: a certificate ends soon",
                           f"site: {name}\nflow: verify-push-pull\nserver certificate: "
                           "{{ event.payload.server_cert_days }} days left\nCA: {{ event.payload.ca_days }} days left\n"
                           "(alerts.cert_days: {{ event.payload.threshold }})")),
    ]


def webhook_block_name(site: Site) -> str:
    return f"crflow-{site_slug(site)}"


def notification_block(site: Site):
    """The id of the block the site's alerts go to: crflow's webhook block (made or updated
    here), or the user's own block; None when the site has no alerts key."""
    alerts = site.alerts
    if alerts.webhook is not None:
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        block = CustomWebhookNotificationBlock(
            name=f"crflow {site_name(site)}", url="{{ url }}", secrets={"url": alerts.webhook.get_secret_value()},  # encrypted by Prefect
            json_data={"subject": "{{ subject }}", "text": "{{ body }}"})
        return block.save(webhook_block_name(site), overwrite=True)
    if alerts.block is not None:
        block_type, block_name = alerts.block.split("/", 1)
        with get_client(sync_client=True) as client:
            try:
                return client.read_block_document_by_name(block_name, block_type).id
            except ObjectNotFound:
                raise CrflowError(f"alerts.block: no notification block {alerts.block} on the Prefect server; "
                                  "make it in the UI (Blocks) or use alerts.webhook") from None
    return None


def remove_alerts(site: Site, keep_block: bool = False) -> int:
    """Delete the site's automations (and crflow's webhook block); how many automations there were."""
    prefix = automation_prefix(site)
    with get_client(sync_client=True) as client:
        mine = [a for a in client.read_automations() if a.name.startswith(prefix)]
        for automation in mine:
            client.delete_automation(automation.id)
        if not keep_block:
            with contextlib.suppress(ObjectNotFound):
                block = client.read_block_document_by_name(webhook_block_name(site), "custom-webhook")
                client.delete_block_document(block.id)
    return len(mine)


def apply_alerts(site: Site) -> int:
    """Replace the site's automations with the current ones; how many were made."""
    remove_alerts(site, keep_block=site.alerts.webhook is not None)
    block_id = notification_block(site)
    if block_id is None:
        return 0
    made = automations(site, block_id)
    for automation in made:
        automation.create()
    return len(made)
