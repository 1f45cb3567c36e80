"""The running service's parts, started and stopped in order: vault, chain, contracts, service
database, relayer and indexer threads.

A runtime has a role: `all` runs every part in one process (tests, `serve` with one API worker);
`supervisor` is that plus the control server for API worker processes; `worker` serves the API only,
over the supervisor's node and database, and asks the supervisor for what needs the operator key
(see `api.workers`). On PostgreSQL several instances may share the database: an `all` or `supervisor`
runtime starts the chain's writers only while it holds the leader lock, and stands by otherwise,
asking the leader for what needs the operator key (see `ledger.leader`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

import api.models  # noqa: F401 - registers the API's tables on the shared metadata
import ledger.points.tables  # noqa: F401 - registers the points tables on the shared metadata
from api import reference
from api.auth import challenge_key, prune_expired
from api.did_host import did_web
from api.reference import Catalogue
from api.secrets import Secrets, open_vault
from api.settings import ServiceSettings
from api.workers import ControlClient, ControlError, ControlServer
from identity.did import DidWeb, Resolver
from identity.settings import IdentitySettings
from identity.vault import Vault
from ledger.access import Verification, verify
from ledger.assembly import Hooks, Keys, Lanes, Ledger, Role, Writers, chain_writers, open_ledger
from ledger.consent import PARTNER_ROLE, UNKNOWN_PARTNER, ControllerState
from ledger.contracts import revert_of
from ledger.errors import BatchItemFailed, ContractRevert, LedgerError
from ledger.lanes import BlockCadence, run_lanes
from ledger.leader import LeaderCallFailed, Leadership, ask_leader, serve_calls, shared_deployment
from ledger.points import FINAL, Completions, prune_idempotency_records
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.store import Checkpointer, create_schema, make_engine, sessions
from ledger.types import Subject, checksummed

log = logging.getLogger(__name__)

SHARED_CATALOGUE_SECONDS = 2.0  # how long reference data is cached when other instances may change it


@dataclass
class Runtime:
    service: ServiceSettings
    chain: ChainSettings
    toolchain: ToolchainSettings
    secrets: Secrets
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    role: Role = "all"
    control_address: str | None = None  # supervisor and workers: the control socket (see api.workers)
    control_key: bytes | None = None
    node_url: str | None = None  # worker: the supervisor's node
    backend_name: str | None = None  # worker: the supervisor's backend, for /health
    supervisor_on_blocks: bool = False  # worker: the supervisor's relayer sends at each block (no wake-ups)
    on_control_lost: Callable[[], None] | None = None  # worker: called when the supervisor is gone
    prune_interval: float = 60.0  # seconds between prunes (`prune`)
    index_wait: float = 30.0  # seconds a binding's request waits for the indexer to read it from the chain
    completions: Completions = field(default_factory=Completions)
    relay_wake: threading.Event = field(default_factory=threading.Event)

    # What `start` opens, in every role (read before it: AttributeError).
    ledger: Ledger = field(init=False)  # the chain, the contracts' clients, request writers and readers
    vault: Vault = field(init=False)
    dids: DidWeb = field(init=False)
    resolver: Resolver = field(init=False)
    engine: Engine = field(init=False)

    # What only some roles run.
    writers: Writers | None = None  # all, supervisor: bindings, indexer, relayers
    cadence: BlockCadence | None = None  # batches timed to the managed node's blocks (see BlockCadence)
    control: ControlClient | None = None  # worker
    control_server: ControlServer | None = None  # supervisor
    leadership: Leadership | None = None  # all, supervisor on PostgreSQL: the leader lock (see ledger.leader)
    on_leadership_lost: Callable[[], None] | None = None  # called when the leader lock is gone (default: stop writers)

    _catalogue: Catalogue | None = None
    _catalogue_at: float = 0.0  # when it was read (monotonic)
    _check_partners: threading.Event = field(default_factory=threading.Event)  # set: verify every role
    _sessions: sessionmaker[Session] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @cached_property
    def signin_key(self) -> bytes:
        """Authenticates the sign-in challenges this service issues (`api.auth.challenge_key`)."""
        return challenge_key(self.secrets.peppers)

    def sessions(self) -> AbstractContextManager[Session]:
        """A write transaction (it takes the database's write lock: keep it short)."""
        assert self._sessions is not None, "the runtime is not started"
        return self._sessions.begin()

    def reads(self) -> AbstractContextManager[Session]:
        """A session for reading only: it never waits for a writer (WAL readers see the last commit)."""
        assert self._sessions is not None, "the runtime is not started"
        return self._sessions()

    def start(self, *, workers: bool = True) -> None:
        worker = self.role == "worker"
        data_dir = self.service.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.vault = open_vault(self.service, self.identity, self.secrets)
        if not worker:
            self.vault.create_schema()

        # The supervisor checkpoints the log in the background (`Checkpointer`): no commit does it.
        self.engine = make_engine(self.service.service_database_url, checkpoints=False)
        self._sessions = sessions(self.engine)
        if not worker:
            create_schema(self.engine)
            with self.sessions() as session:
                reference.seed(session)
        with self.reads() if worker else self.sessions() as session:  # a worker's supervisor recorded it
            self.dids = did_web(session, self.service, self.identity, record=not worker)
        self.resolver = Resolver(self.dids, self.vault)

        keys = Keys(self.secrets.operator, self.secrets.accessor, self.secrets.previous_operator)
        if worker:  # the supervisor's node and deployment; this process never sends a transaction
            assert self.node_url is not None, "a worker needs the supervisor's node URL"
        # On PostgreSQL other instances may share the database: the contracts are the ones it records.
        shared = not worker and self.engine.dialect.name == "postgresql"
        with shared_deployment(self.engine, data_dir / "deployment.json") if shared else nullcontext():
            self.ledger = open_ledger(
                self.chain,
                self.toolchain,
                self.engine,
                data_dir,
                keys=keys,
                tiers=self.service.tiers,
                node_url=self.node_url,
            )
        if worker:
            assert self.control_address is not None and self.control_key is not None
            self.control = ControlClient(
                self.control_address, self.control_key, on_message=self._on_control, on_lost=self._control_lost
            )
            return
        if self.role == "supervisor":
            assert self.control_address is not None and self.control_key is not None
            self.control_server = ControlServer(
                self.control_address,
                self.control_key,
                on_wake=self.relay_wake.set,
                on_invalidate=self.invalidate_catalogue,
                calls={
                    "bind_controller": self._bind_controller,
                    "recovery": self._recovery,
                    "sync_partners": self.sync_partners,
                },
                classify=_classify,
            )
            server = self.control_server
            self.completions.listeners.append(lambda ids: server.broadcast(("done", ids)))
        if workers and self.engine.dialect.name == "postgresql":
            # Other instances may serve this database: the chain's writers run in the one holding the
            # leader lock (`ledger.leader`); the others serve the API and stand by.
            leadership = self.leadership = Leadership(self.service.service_database_url, self.service.instance_name)
            if leadership.try_acquire():
                self._lead(workers=True)
            else:
                log.info("instance %s stands by: another instance runs the chain's writers", leadership.instance)
            self._spawn("leadership", lambda stop: leadership.run(stop, on_gained=self._take_over, on_lost=self._lost))
        else:
            self._lead(workers)

    def _lead(self, workers: bool) -> None:
        """Start the chain's single writers: key bindings, indexer, relayers, housekeeping."""
        self._check_partners.set()  # the node may have restarted from an older state while we were down
        lanes = Lanes(
            max_batch=self.service.relayer_max_batch,
            linger=self.service.relayer_linger,
            max_in_flight=self.service.relayer_max_in_flight,
        )
        hooks = Hooks(self._holds, self._chain_lost_blocks, self.completions, self.relay_wake)
        self.writers = chain_writers(self.ledger, self.engine, lanes, hooks)
        self.sync_partners()
        log.info(
            "chain %s (%s backend), ConsentRegistry at %s since block %s",
            self.ledger.deployment.chain_id,
            self.ledger.backend.name,
            self.ledger.consent.address,
            self.ledger.deployment.deploy_block,
        )
        if workers:
            writers = self.writers
            writers.relayer.recover()
            writers.points_relayer.recover()
            # The node may have restarted from its last checkpoint while we were down (a crash of the
            # machine): check what the previous run settled at once, not after `lost_after`.
            self._node_restarted()
            indexer = writers.indexer
            if (miner := self.ledger.backend.miner) is not None:  # this service makes the blocks: time batches to them
                cadence = self.cadence = BlockCadence()

                def after_block() -> None:
                    cadence.after_block()
                    indexer.wake.set()

                miner.before_block = cadence.before_block
                miner.after_block = after_block
            # Woken after each block (and by bindings), the indexer need not ask the node 20 times a second.
            interval = 0.05 if self.cadence is None else self.cadence.fallback
            self._spawn("indexer", lambda stop: indexer.run(stop, interval=interval))
            self._spawn("relayer", self._relay)
            self._spawn("checkpointer", Checkpointer(self.engine).run)
            self._spawn("maintenance", self._maintain)
            if self.leadership is not None:  # what standbys ask of the leader
                calls = self.leader_calls()
                self._spawn("leader-calls", lambda stop: serve_calls(self.sessions, calls, _classify, stop))

    def leader_calls(self) -> dict[str, Callable[..., Any]]:
        """What a standby asks the leader to make (`_through_leader`), by name, taking JSON arguments."""
        return {
            "bind_controller": lambda s, c: self._bind_controller(bytes.fromhex(s), c),
            "recovery": lambda action, s, *args: self._recovery(action, bytes.fromhex(s), *_from_wire(args)),
        }

    def _take_over(self) -> None:
        """This instance got the leader lock (another instance's leader died): start its writers."""
        try:
            self._lead(workers=True)
        except Exception:
            log.exception("taking over the chain's writers failed")
            self._lost()

    def _lost(self) -> None:
        """The leader lock is gone (or the take-over failed): stop writing to the chain at once. `serve`
        exits (`on_leadership_lost`), to be started again as a standby; otherwise the writers stop."""
        log.critical("this instance no longer holds the leader lock: its chain writers stop")
        if self.on_leadership_lost is not None:
            self.on_leadership_lost()
            return
        self._stop.set()

    # the control connection (role `worker`) ------------------------------------------------------

    def _on_control(self, message: tuple[Any, ...]) -> None:
        if message[0] == "done":  # points requests settled: hand the final rows to this worker's waiters
            waiting = self.completions.finished(message[1])
            if waiting:  # told after the commit: the rows are final
                rows = self.ledger.points_reader.requests(waiting)
                self.completions.notify([r for r in rows if r.status in FINAL])
        elif message[0] == "invalidate":
            self._catalogue = None

    def wake_relayer(self) -> None:
        """New requests are in the database (the supervisor's relayer, from a worker). Not needed when
        the relayer sends at each block (`BlockCadence`): it reads what is pending then."""
        if self.cadence is not None or self.supervisor_on_blocks:
            return
        if self.control is not None:
            self.control.send(("wake",))
        else:
            self.relay_wake.set()

    def _control_lost(self) -> None:
        if self.on_control_lost is not None:
            self.on_control_lost()

    @property
    def chain_backend(self) -> str:
        """The name of the chain backend (a worker reports the supervisor's)."""
        if self.backend_name is not None:
            return self.backend_name
        return self.ledger.backend.name

    def bind_controller(self, subject: bytes, controller: str) -> tuple[str, int]:
        """Bind the subject's key on-chain with the operator key (the supervisor's, from a worker);
        returns the transaction hash and block. Raises ConsentRejected or LedgerError."""
        if self.control is None:
            return self._bind_controller(subject, controller)
        tx_hash, block_number = self._control_call("bind_controller", subject, controller)
        return str(tx_hash), int(block_number)

    def _control_call(self, name: str, *args: Any) -> Any:
        """Call `name` in the supervisor; its refusal by a contract is raised here again as its class."""
        assert self.control is not None
        try:
            return self.control.call(name, *args)
        except ControlError as exc:
            if exc.kind == "rejected":
                error, fields = exc.extra
                raise revert_of(error, fields) from exc
            raise LedgerError(str(exc)) from exc

    def recovery(self, action: str, subject: bytes, *args: Any) -> tuple[str, int]:
        """A step of a key recovery with the operator key (the supervisor's, from a worker): `start`
        (new key), `complete`, or `cancel` (new key, effective at, deadline, the 65-byte signature).
        Returns the transaction hash and block; raises ContractRevert or LedgerError."""
        if self.control is None:
            return self._recovery(action, subject, *args)
        tx_hash, block_number = self._control_call("recovery", action, subject, *args)
        return str(tx_hash), int(block_number)

    def _recovery(self, action: str, subject: bytes, *args: Any) -> tuple[str, int]:
        if self.writers is None:  # a standby: the leader instance sends with the operator key
            return self._through_leader("recovery", [action, subject.hex(), *_to_wire(args)])
        self._still_leading()
        writers = self._writers()
        receipt = writers.bindings.recovery(action, Subject(subject), *args)
        writers.indexer.wake.set()
        return receipt.tx_hash, receipt.block_number

    def _bind_controller(self, subject: bytes, controller: str) -> tuple[str, int]:
        if self.writers is None:  # a standby: the leader instance sends with the operator key
            return self._bind_through_leader(subject, controller)
        self._still_leading()
        writers = self.writers
        receipt = writers.bindings.bind(Subject(subject), controller)
        writers.indexer.wake.set()
        return receipt.tx_hash, receipt.block_number

    def _still_leading(self) -> None:
        """Before a transaction signed with the operator key outside the relayer (which checks the same
        itself): refused once this instance's hold on the leader lock is no longer known to be fresh, as
        another instance may be the leader already (their operator nonces would collide)."""
        if self.leadership is not None and not self.leadership.fresh():
            raise LedgerError("this instance no longer runs the chain's writers; ask again")

    def _bind_through_leader(self, subject: bytes, controller: str) -> tuple[str, int]:
        """A standby's binding: asked of the leader through the database (`ledger.leader.ask_leader`)."""
        return self._through_leader("bind_controller", [subject.hex(), controller])

    def _through_leader(self, name: str, args: list[Any]) -> tuple[str, int]:
        """A standby's call of `name` (JSON arguments), made by the leader; its refusal by a contract is
        raised here again as its class."""
        try:
            tx_hash, block_number = ask_leader(self.sessions, name, args)
        except LeaderCallFailed as exc:
            if exc.kind == "rejected":
                error, fields = exc.extra
                raise revert_of(error, fields) from exc
            raise LedgerError(str(exc)) from exc
        return str(tx_hash), int(block_number)

    def _relay(self, stop: threading.Event) -> None:
        writers = self._writers()
        run_lanes(
            [writers.relayer, writers.points_relayer],
            self.relay_wake,
            stop,
            linger=self.service.relayer_linger,
            cadence=self.cadence,
            may_run=None if self.leadership is None else self.leadership.fresh,
        )

    def _maintain(self, stop: threading.Event) -> None:
        """Every second: restart the managed node if it died; give new partners their on-chain role;
        put back the key bindings and partner roles the chain lost. Every `prune_interval`: `prune`."""
        next_prune = time.monotonic()
        while not stop.wait(1.0):
            try:
                self.supervise_node()
                self.restore_standing()
            except Exception:  # the chain may be briefly unavailable; try again next round
                log.exception("maintenance failed")
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_interval
                self.prune()

    def prune(self) -> None:
        """Delete what has expired: sign-ins and customer sessions, partners' old Idempotency-Keys."""
        keep_keys = timedelta(hours=self.service.idempotency_key_hours)
        steps: list[tuple[str, Callable[[], int]]] = [
            ("expired sign-in messages and customer sessions", lambda: prune_expired(self.sessions)),
            ("Idempotency-Keys", lambda: prune_idempotency_records(self.sessions, keep_keys)),
        ]
        for what, step in steps:
            try:
                if pruned := step():
                    log.info("pruned %d %s", pruned, what)
            except Exception:  # the database may be busy; the next round tries again
                log.exception("pruning %s failed", what)

    def restore_standing(self) -> None:
        """Give new partners their role; after a possible loss of blocks (see `_chain_lost_blocks`), put
        back the key bindings and partner roles that the chain no longer holds."""
        bindings = self._writers().bindings
        self.sync_partners(verify=self._check_partners.is_set())
        if bindings.check.is_set():
            bindings.restore()

    def _chain_lost_blocks(self, ancestor: int) -> None:
        """The indexer rolled back to `ancestor`: what was bound or granted after it may be gone."""
        self._writers().bindings.check.set()
        self._check_partners.set()

    def _holds(self, error: str, subject: bytes, partner: str | None) -> bool:
        """Whether a relayer should queue a request rejected with `error` again rather than fail it:
        the chain lost the subject's binding or the partner's role, which the service made and puts
        back (`restore_standing`)."""
        from api.models import Partner

        if self._writers().bindings.holds(error, subject):
            return True
        if error not in UNKNOWN_PARTNER or partner is None:
            return False
        with self.reads() as session:
            granted = session.scalar(
                select(Partner.on_chain).where(Partner.address == partner, Partner.retired_at.is_(None))
            )
        if granted:
            self._check_partners.set()
        return bool(granted)

    def supervise_node(self) -> None:
        """A managed node that died is started again on the same port and data. (anvil: blocks it mined
        after its last state dump are gone: the indexer sees that as a reorganisation and the relayer
        re-sends what was lost. geth keeps every block it made.)"""
        backend = self.ledger.backend
        if not self.chain.supervise or self._stop.is_set():
            return
        # `_node_restarted` before it answers: the relayer takes the operator's nonce again before it sends
        # anything more, and sends nothing signed before (with a nonce the lost blocks may have used).
        if backend.restart_if_stopped(before=self._node_restarted):
            self._chain_lost_blocks(-1)  # the indexer will see it too; no need to wait for it

    def _node_restarted(self) -> None:
        """Tell the relayers that the node may have lost blocks: they check what they settled, and send
        nothing new until the indexer has compared the read model with the chain (and queued again
        what the lost blocks held)."""
        writers, began = self._writers(), time.monotonic()
        indexer = writers.indexer
        for lane in (writers.relayer, writers.points_relayer):
            lane.node_restarted(lambda: indexer.checked_at > began)

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def verify_access_log(self) -> Verification:
        ledger = self.ledger
        return verify(ledger.w3, ledger.access_log, self.engine, ledger.deployment.contracts["AccessLog"].block_number)

    def catalogue(self) -> Catalogue:
        """Reference data, cached until an operator changes it."""
        catalogue = self.cached_catalogue()
        if catalogue is None:
            with self.reads() as session:  # no write lock for a read
                catalogue = self._catalogue = Catalogue(session)
                self._catalogue_at = time.monotonic()
        return catalogue

    def cached_catalogue(self) -> Catalogue | None:
        """The reference data if cached (no database read: for the event loop). On PostgreSQL another
        instance may change it, and its invalidation reaches this instance's processes only: read it
        again after `SHARED_CATALOGUE_SECONDS`."""
        catalogue = self._catalogue
        if (
            catalogue is not None
            and self.engine.dialect.name == "postgresql"
            and time.monotonic() - self._catalogue_at > SHARED_CATALOGUE_SECONDS
        ):
            return None
        return catalogue

    def invalidate_catalogue(self) -> None:
        """Forget the cached reference data, in every process of the service."""
        self._catalogue = None
        if self.control is not None:
            self.control.send(("invalidate",))
        if self.control_server is not None:
            self.control_server.broadcast(("invalidate",))

    def sync_partners(self, *, verify: bool = False) -> None:
        """Give every new partner the partner role on-chain (the operator is the registry's admin here),
        and take it from every retired one; with `verify`, check every partner, in case the chain lost
        a grant or a revocation."""
        from api.models import Partner

        if self.control is not None:
            self.control.call("sync_partners")
            return
        if self.writers is None:  # a standby: the leader's housekeeping does it within a second
            return
        consent = self.ledger.consent
        if verify:
            self._check_partners.clear()
        query = select(Partner.address, Partner.on_chain, Partner.retired_at.is_not(None))
        to_do = (Partner.on_chain.is_(False) & Partner.retired_at.is_(None)) | (
            Partner.on_chain.is_(True) & Partner.retired_at.is_not(None)
        )
        with self.reads() as session:  # the chain is asked outside any write transaction
            partners = session.execute(query if verify else query.where(to_do)).all()
        try:
            for address, on_chain, retired in partners:
                holds = consent.has_role(PARTNER_ROLE, checksummed(address))
                if holds == retired:
                    if retired:
                        consent.remove_partner(checksummed(address))
                        if not on_chain:
                            log.warning("the chain had lost retired partner %s's revocation; revoked again", address)
                    else:
                        consent.add_partner(checksummed(address))
                        if on_chain:
                            log.warning("the chain had lost the partner role of %s; granted it again", address)
                if on_chain == retired:
                    with self.sessions() as session:
                        session.execute(update(Partner).where(Partner.address == address).values(on_chain=not retired))
                    self.invalidate_catalogue()
        except BaseException:
            if verify:
                self._check_partners.set()  # verify again next round
            raise

    def wait_for_controller(self, subject: bytes, controller: str | None = None) -> None:
        """Block until the indexer has seen the subject's controller binding (to `controller`, if
        given: a recovery's new key); TimeoutError after `index_wait` s."""
        deadline = time.monotonic() + self.index_wait
        while time.monotonic() < deadline:
            with self.reads() as session:
                state = session.get(ControllerState, subject)
                if state is not None and (controller is None or state.controller == controller):
                    return
            if self.writers is not None:  # a worker's binding woke the supervisor's indexer
                self.writers.indexer.wake.set()
            time.sleep(0.02)
        raise TimeoutError("the controller binding was not indexed in time")

    def _writers(self) -> Writers:
        """The chain's writers (roles `all` and `supervisor` only)."""
        assert self.writers is not None, f"a {self.role} runtime runs no chain writers"
        return self.writers

    def stop(self) -> None:
        """Stop what `start` started, in reverse, also after a start that failed part way."""
        started = vars(self)  # the parts `start` got to (unset `field(init=False)`s are absent)
        self._stop.set()
        if self.control is not None:
            self.control.close()
        if self.control_server is not None:
            self.control_server.close()
        ledger: Ledger | None = started.get("ledger")
        if ledger is not None:
            ledger.writer.close()
            ledger.inserts.close()
        self.relay_wake.set()
        if self.cadence is not None:
            self.cadence.signal.set()
        if self.writers is not None:
            self.writers.indexer.wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        if self.leadership is not None:  # after the writers stopped: another instance may take over now
            self.leadership.close()
        if ledger is not None:
            ledger.backend.stop()
        if self.writers is not None:
            self.writers.close()
        if "engine" in started:
            self.engine.dispose()
        if "vault" in started:
            self.vault.engine.dispose()


def _classify(exc: BaseException) -> tuple[str, str, Any]:
    """How a failed control call is told to the worker: (kind, message, what it needs to raise it again)."""
    if isinstance(exc, ContractRevert) and not isinstance(exc, BatchItemFailed):
        return "rejected", str(exc), (exc.error, exc.args_by_name)
    if isinstance(exc, LedgerError):
        return "ledger", str(exc), None
    return "error", f"{type(exc).__name__}: {exc}", None


def _to_wire(args: tuple[Any, ...]) -> list[Any]:
    """A recovery step's arguments as JSON for a call through the database (bytes as 0x-hex)."""
    return [{"bytes": arg.hex()} if isinstance(arg, bytes) else arg for arg in args]


def _from_wire(args: tuple[Any, ...]) -> list[Any]:
    return [bytes.fromhex(arg["bytes"]) if isinstance(arg, dict) and "bytes" in arg else arg for arg in args]
