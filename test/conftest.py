"""Shared test setup: one ROS domain per test run, single-threaded BLAS/torch."""
import os

# Every process of this run (nodes started by tests included) shares one domain id
# that no other run on the machine uses at the same time.
os.environ.setdefault("ROS_DOMAIN_ID", str(int(os.environ.get("SCPO_TEST_DOMAIN_ID", 1 + os.getpid() % 100))))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
