"""Association policy: our called AE title and the calling-AE allowlist.

pynetdicom rejects with the proper A-ASSOCIATE-RJ reasons (PS3.8 9.3.4):
called AE title not recognised (rejected-permanent, service-user, reason 7),
calling AE title not recognised (reason 3), local limit exceeded (transient,
service-provider presentation, reason 2). For an allowlist entry that names a host,
the list of acceptable calling AE titles depends on the peer's address; the
:class:`NodeAE` computes it per association thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association

from dicom_node.config import AllowedCaller
from dicom_node.receive import reactor
from dicom_node.receive.negotiation import NegotiationGate

# A title no peer can send (16 characters with a control character), meaning "nobody".
_NOBODY = "\x01NOBODY"


class CallerPolicy:
    """Which (calling AE, host) pairs may associate."""

    def __init__(self, allowed: Sequence[AllowedCaller]) -> None:
        self._allowed = [(a.ae_title.strip(), a.host) for a in allowed]

    @property
    def restricted(self) -> bool:
        """True when an allowlist is configured."""
        return bool(self._allowed)

    def titles_for_host(self, host: str | None) -> list[str]:
        """Calling AE titles acceptable from ``host``."""
        titles = [t for t, h in self._allowed if h is None or h == host]
        return titles or [_NOBODY]

    def is_allowed(self, calling_ae: str, host: str | None) -> bool:
        """True when ``calling_ae`` from ``host`` may associate."""
        if not self.restricted:
            return True
        return calling_ae.strip() in self.titles_for_host(host)


class NodeAE(ApplicationEntity):
    """An AE whose calling-AE allowlist depends on the peer's address."""

    def __init__(self, ae_title: str, policy: CallerPolicy, shared_listen: Any = None,
                 gate: NegotiationGate | None = None,
                 on_tls_failure: Callable[[str, str], None] | None = None) -> None:
        super().__init__(ae_title)
        self.caller_policy = policy
        self.require_called_aet = True
        self.shared_listen = shared_listen  # a shared_server.SharedListen in an acceptor process
        self.negotiation_gate = gate  # connections without a complete A-ASSOCIATE-RQ yet
        self.on_tls_failure = on_tls_failure  # (peer, reason) of a failed TLS handshake
        self.max_instance_bytes = 0  # a C-STORE dataset past this is not buffered (0: no limit)

    @property
    def maximum_associations(self) -> int:
        """The limit pynetdicom compares this process's associations with.

        In an acceptor process it is the global limit minus what the other acceptors
        hold, so the limit holds across all of them (see :mod:`dicom_node.receive.board`).
        pynetdicom compares it with every live acceptor thread of this process, but only
        those whose A-ASSOCIATE-RQ was read hold a slot (:mod:`dicom_node.receive.negotiation`):
        the others (still negotiating, or closed and not yet ended) are added back.
        """
        shared = getattr(self, "shared_listen", None)
        if shared is None:
            limit = int(self._maximum_associations)
        else:
            limit = max(0, shared.max_associations - shared.board.others_active(shared.row))
        gate: NegotiationGate | None = getattr(self, "negotiation_gate", None)
        if gate is None:
            return limit
        threads = sum(1 for a in self.active_associations if a.is_acceptor)
        return limit + max(0, threads - gate.holding())

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._maximum_associations = max(1, int(value))

    @property
    def require_calling_aet(self) -> list[str]:
        """pynetdicom reads this during negotiation, in the association's thread."""
        policy: CallerPolicy | None = getattr(self, "caller_policy", None)
        if policy is None or not policy.restricted:
            return []
        thread = threading.current_thread()
        host = thread.requestor.address if isinstance(thread, Association) else None
        return policy.titles_for_host(host)

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        if ae_titles:
            raise ValueError("configure callers through CallerPolicy")

    def make_server(self, address: Any, *args: Any, **kwargs: Any) -> Any:
        """pynetdicom's server, with event-driven acceptor reactors and quickly copied contexts.

        See :mod:`dicom_node.receive.reactor`; other pynetdicom versions get the stock server.
        """
        if not reactor.supported():
            return super().make_server(address, *args, **kwargs)
        from dicom_node.receive.shared_server import GatedAssociationServer, SharedSocketServer

        shared = getattr(self, "shared_listen", None) is not None
        kwargs["server_class"] = SharedSocketServer if shared else GatedAssociationServer
        kwargs.setdefault("request_handler", reactor.WakingRequestHandler)
        server = super().make_server(address, *args, **kwargs)
        server.contexts = reactor.QuickCopyContexts(server.contexts)
        return server
