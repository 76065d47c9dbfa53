"""Core tier: the dvmm core on the real /dev/kvm with Debian's SeaBIOS."""

from __future__ import annotations

import pytest
from corevm import kvm_usable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = kvm_usable()
    for item in items:
        if "tests/core/" in str(item.fspath):
            item.add_marker(pytest.mark.core)
            if reason is not None and "firmware" in item.name:
                item.add_marker(pytest.mark.skip(reason=reason))
