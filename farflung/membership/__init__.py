"""Elastic membership: the coordinator that admits, watches and re-forms the workers of a
run (``coordinator``: its decisions; ``connections``: who may connect, one reader and
one writer per worker; ``protocol``: the wire both ends share and the check of every
message), a worker's side of it (``member``) and the authenticated state transfer that
brings a newcomer up to date (``state_transfer``). Above the transport
(``farflung.comm``), below the training loop that uses it (``farflung.train``)."""
