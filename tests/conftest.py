"""Fixtures: the node as a real process, DCMTK's storescp as the PACS, a test PKI. The
helpers they use (and tests import) are in ``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, StoreSCP, WebInProcess


def pytest_configure(config):
    # Every node keeps numba's compiled scan kernels in its own data folder (a service
    # account may not write beside the package): in tests that meant compiling them again for
    # each node started with a worker (~5 s each). One cache for the run, beside pytest's own;
    # numba keys its entries by source and CPU, so a stale entry is never used.
    cache = Path(str(config.rootpath)) / ".pytest_cache" / "numba"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache))
    # Registered here too, so that a run without xdist (-p no:xdist) passes --strict-markers.
    config.addinivalue_line("markers", "xdist_group(name): run on one xdist worker")
    if hasattr(config, "workerinput"):  # an xdist worker
        config.pluginmanager.register(_XdistGroupIds(), "mammo-xdist-group-ids")


#: Modules whose tests take the longest (a group of them on one worker: test_training ~130 s,
#: test_distributed ~120 s; the rest 20-60 s a test), measured with --durations. They are
#: handed out first: xdist's loadgroup scheduler gives work in collection order, and these
#: sorted late in the alphabet (training, topology, worker_healing) left one worker running
#: them alone at the end.
SLOW_FIRST = (
    "test_training",
    "test_distributed",
    "test_topology",
    "test_worker_healing",
    "test_ohif",
    "test_results_pipeline",
    "test_training_hygiene",
    "test_orthanc_e2e",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
    # For pytest-xdist (--dist loadgroup): the tests of a module that shares a module-scoped
    # fixture (a trained checkpoint, a database full of studies) run on one worker, so the
    # fixture is built once (test_distributed's takes ~80 s). Runs before xdist's own hook,
    # which turns the mark into the node id's "@group" suffix the scheduler reads.
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


class _XdistGroupIds:
    """xdist 3.8 writes the group into ``item._nodeid``; pytest 9.2 reads a node id from
    ``item._id`` (``Node.nodeid`` is ``str(self._id)``), so the suffix never reached the
    scheduler and every worker built the module fixtures again. Carry it over, after xdist's
    hook has run (compat shim: drop it once xdist sets the id pytest reads)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        from _pytest.nodeid import NodeId

        for item in items:
            grouped = item.__dict__.get("_nodeid")
            if isinstance(grouped, str) and grouped != item.nodeid:
                item._id = NodeId.parse(grouped)


@pytest.fixture
def node_factory(tmp_path):
    started: list[NodeProcess] = []

    def make(
        settings: dict | None = None,
        sub: str = "n",
        start: bool = True,
        data_dir: Path | None = None,
        worker: bool = False,
        env: dict | None = None,
        role: str | None = None,
    ) -> NodeProcess:
        d = tmp_path / f"{sub}{len(started)}"
        d.mkdir()
        n = NodeProcess(d, settings, data_dir=data_dir, worker=worker, env=env, role=role)
        started.append(n)
        return n.start() if start else n

    yield make
    for n in started:
        n.stop()


@pytest.fixture
def web_factory(tmp_path):
    """DICOMweb served in the test process (tests.helpers.WebInProcess): what an HTTP test
    needs without a node process."""
    made: list[WebInProcess] = []

    def make(settings: dict | None = None, **dicomweb) -> WebInProcess:
        d = tmp_path / f"web{len(made)}"
        d.mkdir()
        w = WebInProcess(d, settings, **dicomweb)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    return node_factory()


@pytest.fixture
def storescp_factory(tmp_path):
    made: list[StoreSCP] = []

    def make(
        port: int | None = None, start: bool = True, extra: list[str] | None = None
    ) -> StoreSCP:
        s = StoreSCP(tmp_path / f"pacs{len(made)}", port, extra=extra)
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A test CA with node, PACS, client, expired and unknown-CA certificates (openssl)."""
    from tests.pki import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server (Debian's postgresql) on a free loopback port, for the session."""
    from tests.pg import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """The database-facing tests run twice: on a SQLite file and on a new PostgreSQL
    database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_server").new_database()
