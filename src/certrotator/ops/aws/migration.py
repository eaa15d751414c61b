"""What `certrotator aws check` looks for when an account runs, or ran, the seed
(aws-greengrass-labs-certificate-rotator): its CloudFormation stack, its IoT rules, its Greengrass
component. This backend keeps the seed's names (stack `AWSLabsCertificateRotator`, functions and rules
`<stack>CreateCertificate` / `CommitCertificate` / `JobExecutionTerminal`, job template `<stack>`, topic
`<stack>Notification`, state shadow `AWSLabsCertificateRotator`) and speaks the seed's protocol, so the
switch is: the seed's stack out, this one in under the same name; then the component (infra/README.md,
"Switching from the seed"). Two backends must never answer the same requests: each would issue a
certificate for one CSR."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from certrotator.ops.aws.checks_model import Check, Status
from certrotator.ops.aws.clients import AwsClients
from certrotator.ops.aws.greengrass import DEFAULT_COMPONENT
from certrotator.protocol import Topics

# Our stack always exports the key it signs rotation state with; the seed's stack exports nothing.
OUR_STACK_OUTPUT: Final = "StateKeySecretArn"
RULE_SUFFIXES: Final = {"create": "CreateCertificate", "commit": "CommitCertificate"}
# The seed's terminal rule reads every job execution event and keeps those whose statusDetails the seed's
# component filled in; ours takes '$aws/events/jobExecution/+/+' and decides from its own state.
JOB_EXECUTION_EVENTS: Final = re.compile(r"^\$aws/events/jobExecution/")
SEED_TERMINAL_SQL: Final = "statusDetails.CertificateRotator"
# The seed's component: a zip of Python scripts run by main.py (this project ships certrotator.zip, a
# wheel, and runs `certrotator.cli agent`).
SEED_RECIPE_MARKERS: Final = ("certificate-rotator.zip", "main.py")
OUR_RECIPE_MARKER: Final = "certrotator.cli agent"
SWITCH: Final = "see infra/README.md, 'Switching from the seed'"
MAX_RULES: Final = 10_000


def is_seed_stack(outputs: Mapping[str, str]) -> bool:
    return OUR_STACK_OUTPUT not in outputs


def seed_stack_check(name: str, status: str) -> Check:
    return Check(
        name,
        Status.FAIL,
        f"{status}, but it is the seed's stack (aws-greengrass-labs-certificate-rotator: no "
        f"{OUR_STACK_OUTPUT} output); its functions answer rotation requests",
        f"finish or cancel its rotation jobs, delete it, then deploy this one under the same name: {SWITCH}",
    )


def rule_name(stack: str, suffix: str) -> str:
    """As the stack names its rules (rule names allow [a-zA-Z0-9_] only)."""
    return f"{stack.replace('-', '_')}{suffix}"


def _rules(clients: AwsClients) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    token: str | None = None
    while len(rules) < MAX_RULES:
        page = clients.iot.list_topic_rules(nextToken=token) if token else clients.iot.list_topic_rules()
        rules += [dict(r) for r in page.get("rules", [])]
        token = page.get("nextToken")
        if not token:
            break
    return rules


def check_rules(clients: AwsClients, stack: str) -> Check:
    """Exactly the stack's own rules answer create and commit requests, and no seed terminal rule acts
    on job execution events beside it."""
    name = "rotation rules"
    enabled = [r for r in _rules(clients) if not r.get("ruleDisabled")]
    problems: list[str] = []
    others: list[str] = []
    for kind, suffix in RULE_SUFFIXES.items():
        ours = rule_name(stack, suffix)
        topic = Topics.create("+") if kind == "create" else Topics.commit("+")
        answering = [str(r.get("ruleName")) for r in enabled if r.get("topicPattern") == topic]
        if ours not in answering:
            problems.append(f"{ours} does not answer {topic} (missing or disabled)")
        others += [f"{r} ({kind})" for r in answering if r != ours]
    for rule in enabled:
        rule_id = str(rule.get("ruleName"))
        if JOB_EXECUTION_EVENTS.match(str(rule.get("topicPattern", ""))):
            sql = clients.iot.get_topic_rule(ruleName=rule_id).get("rule", {}).get("sql", "")
            if SEED_TERMINAL_SQL in sql:
                others.append(f"{rule_id} (the seed's terminal rule)")
    if others:
        return Check(
            name,
            Status.FAIL,
            f"other rules answer rotation requests too: {', '.join(others)}; each backend would issue a "
            "certificate for one request and clean up after the other",
            f"delete the seed's stack ({SWITCH}), or disable them: aws iot disable-topic-rule --rule-name NAME",
        )
    if problems:
        return Check(name, Status.FAIL, "; ".join(problems), "deploy the stack (cd infra && npx cdk deploy)")
    return Check(name, Status.PASS, f"only {stack}'s rules answer create and commit requests")


# ------------------------------------------------------------------------------------------- devices


def is_seed_recipe(recipe: str) -> bool:
    return OUR_RECIPE_MARKER not in recipe and any(marker in recipe for marker in SEED_RECIPE_MARKERS)


def check_component(clients: AwsClients, group: str, group_arn: str, deployment: dict[str, Any]) -> Check:
    """Which rotator component the group's latest deployment runs: the seed's rotates against this
    backend, but runs as root from a venv the run-as user owns."""
    name = f"{DEFAULT_COMPONENT} ({group})"
    version = deployment.get("components", {}).get(DEFAULT_COMPONENT, {}).get("componentVersion")
    deploy = (
        "certrotator component build --version 2.0.0 && certrotator aws component publish && "
        f"certrotator aws deploy-component 2.0.0 --thing-group {group}"
    )
    if not version:
        return Check(name, Status.WARN, "not in the group's latest deployment: nothing rotates there", deploy)
    _, partition, _, region, account = group_arn.split(":")[:5]
    arn = f"arn:{partition}:greengrass:{region}:{account}:components:{DEFAULT_COMPONENT}:versions:{version}"
    recipe = clients.greengrass.get_component(arn=arn, recipeOutputFormat="YAML")["recipe"]
    text = recipe.decode("utf-8", "replace") if isinstance(recipe, bytes) else str(recipe)
    if is_seed_recipe(text):
        return Check(
            name,
            Status.WARN,
            f"{version} is the seed's component: it rotates against this backend, but root runs it from a "
            "venv in its work directory, which the nucleus hands to the run-as user (ggc_user)",
            f"{deploy} (a version above the seed's; no seed rotation in flight on the group: {SWITCH})",
        )
    return Check(name, Status.PASS, f"certrotator's component {version}")
