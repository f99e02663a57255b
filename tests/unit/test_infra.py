"""The local services' own helpers."""
from __future__ import annotations

from infra.services import new_cluster_id


def test_a_cluster_id_never_starts_with_a_dash():
    draws = iter([b"\xfb" + bytes(15), bytes(range(16))])      # the first encodes to "-..."
    cluster_id = new_cluster_id(lambda: next(draws))
    assert cluster_id == "AAECAwQFBgcICQoLDA0ODw" and len(cluster_id) == 22
