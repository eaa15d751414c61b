"""Who may connect to the local broker and which topics a thing may use, decided on the registry
(the broker's `ConnectionAuthorizer`): the rules of AWS IoT Core for the rotation protocol."""

from __future__ import annotations

from certrotator.backend.ports import CertificateStatus
from certrotator.local.policy import TopicAction, default_topic_policy
from certrotator.local.policy_documents import policy_allows
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import client_id_is_for_thing


class RegistryAuthorizer:
    """Called on the broker's loop for every CONNECT, SUBSCRIBE and PUBLISH: keep it to indexed reads."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry

    def authorize_connect(self, client_id: str, principal: str) -> str | None:
        """The thing of an ACTIVE certificate attached to one, if the client id is that thing's."""
        cert = self.registry.certificate(principal)
        if cert is None or cert.status is not CertificateStatus.ACTIVE or cert.thing is None:
            return None
        return cert.thing if client_id_is_for_thing(client_id, cert.thing) else None

    def authorize_topic(self, thing: str, topic: str, action: TopicAction) -> bool:
        if default_topic_policy(thing, topic, action):
            return True  # the protocol's own topics: decided without touching the registry
        # Anything else only if a policy attached to one of the thing's certificates allows it.
        documents = [
            document
            for cert in self.registry.thing_principals(thing)
            for name in self.registry.certificate_policies(cert)
            if (document := self.registry.policy(name)) is not None
        ]
        return policy_allows(documents, thing, thing, topic, action)
