"""Shared test setup: one ROS domain per test run, one compute thread per process."""
import os

# Every process of this run (nodes started by tests included) shares one domain id
# that no other run on the machine uses at the same time.
os.environ.setdefault("ROS_DOMAIN_ID", str(int(os.environ.get("SCPO_TEST_DOMAIN_ID", 1 + os.getpid() % 100))))
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
# Tests start node processes beside pytest on a 2-core machine: OpenMP/BLAS thread pools
# that spin while another process holds the other core slow everything down by 10x+.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long system tests (full DDS graphs, load); deselect with -m 'not slow'")
