"""runtime: the allocator setting the CLI applies, and its off switch."""

import sys

import pytest

from nanotune.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    assert keep_freed_memory() is True
    monkeypatch.setenv("NANOTUNE_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
