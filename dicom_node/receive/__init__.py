"""The receive side: what takes instances in from peers and registers them.

The Storage SCP (:mod:`.scp`) and its association policy (:mod:`.policy`,
:mod:`.negotiation`), the event-driven reactors (:mod:`.reactor`), the listener that binds
once and the acceptor processes that serve on its socket (:mod:`.listener`,
:mod:`.acceptor`, :mod:`.shared_server`, :mod:`.board`), and ingest (:mod:`.ingest`), which
writes each instance to the spool and registers it in the state database before the
C-STORE is answered. Peer plumbing shared with the sending side (SCU, TLS, statuses) stays
in :mod:`dicom_node.net`, which imports nothing from here.
"""
