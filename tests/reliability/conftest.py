import subprocess

import pytest

from tests.s3 import bucket, s3_server  # noqa: F401  (fixtures)


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB filesystem (tmpfs) where this process may mount one; else the test is marked as injected."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
                             capture_output=True).returncode == 0
    yield mountpoint if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
