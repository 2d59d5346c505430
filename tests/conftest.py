"""Test-wide set-up: 8 fake CPU devices for the sharding and ring tests.

Must run before JAX is imported anywhere, which conftest guarantees.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
