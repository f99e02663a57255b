"""The local services (a broker, a DynamoDB endpoint, a Spark standalone cluster), defined from the configuration."""
from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from infra.process import ManagedProcess, ServiceError
from models.config import REPO_ROOT, Config

HOST = "127.0.0.1"
KAFKA_JARS = REPO_ROOT / ".cache" / "jars" / "kafka"


def new_cluster_id(draw=lambda: uuid.uuid4().bytes) -> str:
    """A random KRaft cluster id (URL-safe base64 of 16 bytes), never starting with "-": the
    storage tool would read such an id as an option and refuse to format (1 start in 64)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaBroker:
    """A single-node Apache Kafka broker in KRaft mode (combined broker and controller).

    Optionally (``kafka.local.sasl_port``) a second client listener, SASL_PLAINTEXT with
    SCRAM-SHA-256 and SCRAM-SHA-512, whose users (``kafka.local.sasl_users``) are created at each
    start through the PLAINTEXT listener, which stays as it is for everything else.
    """

    name = "Kafka broker"
    SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.port = int(cfg.get_path("kafka.local.port"))
        self.controller_port = int(cfg.get_path("kafka.local.controller_port"))
        sasl_port = cfg.get_path("kafka.local.sasl_port", None)
        self.sasl_port = int(sasl_port) if sasl_port else None
        self.proc = ManagedProcess(self.name, cfg.path("run_dir") / "kafka", HOST, self.port)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def sasl_bootstrap(self) -> str | None:
        """The SASL_PLAINTEXT listener's address (None when it is off)."""
        return f"{HOST}:{self.sasl_port}" if self.sasl_port else None

    def sasl_users(self) -> dict[str, str]:
        """The configured SASL users, name -> password (checked: names and passwords are text)."""
        users = self.cfg.get_path("kafka.local.sasl_users", None) or {}
        if not isinstance(users, dict) or not all(isinstance(n, str) and n and isinstance(p, (str, int))
                                                  and str(p) for n, p in users.items()):
            # Never the values: they are passwords.
            raise ServiceError("kafka.local.sasl_users must map each user name to a non-empty password")
        if users and not self.sasl_port:
            raise ServiceError("kafka.local.sasl_users is set but kafka.local.sasl_port is not: "
                               "set the SASL listener's port")
        return {name: str(password) for name, password in users.items()}

    def properties(self) -> str:
        data_dir = self.proc.home / "data"
        listeners = [f"PLAINTEXT://{HOST}:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT"]
        sasl: list[str] = []
        if self.sasl_port:
            listeners.append(f"SASL_PLAINTEXT://{HOST}:{self.sasl_port}")
            protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
            sasl.append(f"sasl.enabled.mechanisms={','.join(self.SASL_MECHANISMS)}")
            # The broker side of SCRAM needs a login module and no option: the users' salted
            # credentials live in the cluster metadata (created by create_sasl_users).
            sasl += [f"listener.name.sasl_plaintext.{m.lower()}.sasl.jaas.config="
                     "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                     for m in self.SASL_MECHANISMS]
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{HOST}:{self.controller_port}",
            f"listeners={','.join(listeners)},CONTROLLER://{HOST}:{self.controller_port}",
            f"advertised.listeners={','.join(listeners)}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={','.join(protocols)},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            *sasl,
            f"log.dirs={data_dir}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            f"num.partitions={int(self.cfg.get_path('kafka.partitions'))}",
            "auto.create.topics.enable=true",
            "log.retention.hours=168",
            "",
        ])

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise ServiceError("java is not on PATH: run scripts/setup.sh (it installs OpenJDK 17)")
        if not any(KAFKA_JARS.glob("kafka_2.13-*.jar")):
            raise ServiceError(f"no Kafka jars in {KAFKA_JARS}: run scripts/setup.sh first")
        heap = str(self.cfg.get_path("kafka.local.heap", "512m"))
        return [java, f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                "-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS",
                "-Dorg.slf4j.simpleLogger.log.org.apache.kafka=warn",
                "-Dorg.slf4j.simpleLogger.log.kafka=warn",
                "-Dorg.slf4j.simpleLogger.log.kafka.server.KafkaRaftServer=info",
                "-cp", str(KAFKA_JARS / "*"), main, *args]

    def start(self, timeout: float = 90) -> bool:
        home = self.proc.home
        home.mkdir(parents=True, exist_ok=True)
        config_file = home / "server.properties"
        users = self.sasl_users()
        if self.proc.pid() is None:
            config_file.write_text(self.properties())
            if not (home / "data" / "meta.properties").exists():
                cluster_id = new_cluster_id()
                result = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                                                   "-c", str(config_file)),
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise ServiceError(f"formatting the Kafka storage in {home / 'data'} failed:\n"
                                       f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        started = self.proc.start(self._java("kafka.Kafka", str(config_file)), self.ready, timeout)
        if users:
            self.create_sasl_users(users, timeout)
        return started

    def create_sasl_users(self, users: dict[str, str], timeout: float = 30) -> None:
        """Create or update each user's SCRAM credentials (both mechanisms), through the PLAINTEXT
        listener; returns once the SASL listener accepts the first of them.

        At every start, so a changed password applies at the next one; nothing is passed on a
        command line and the broker stores only salted hashes.
        """
        from kafka.admin import KafkaAdminClient

        if not self.sasl_port:
            raise ServiceError("SASL users need the SASL listener: set kafka.local.sasl_port")
        try:
            from kafka.admin import UserScramCredentialUpsertion
        except ImportError:
            raise ServiceError("creating the SASL users needs kafka-python 3 or later (its admin client's "
                               "alter_user_scram_credentials): run scripts/setup.sh") from None
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=15000)
        failed: dict[str, str] = {}
        try:
            for mechanism in self.SASL_MECHANISMS:    # one request per mechanism: the broker refuses
                errors = admin.alter_user_scram_credentials(   # a user twice in one request
                    [UserScramCredentialUpsertion(name, mechanism, password) for name, password in users.items()])
                failed.update({name: f"{mechanism}: {error}" for name, error in errors.items() if error})
        finally:
            admin.close()
        if failed:
            raise ServiceError(f"{self.name}: creating the SASL users failed: "
                               + "; ".join(f"{name}: {error}" for name, error in failed.items()))
        name, password = next(iter(users.items()))
        self.proc.wait_ready(lambda: self._sasl_login(name, password), timeout)

    def _sasl_login(self, user: str, password: str) -> bool:
        """One admin request over the SASL listener as ``user`` (the credentials reach it shortly
        after the controller committed them)."""
        from kafka.admin import KafkaAdminClient

        from models.clients import Secret

        # A refused login is retried by kafka-python until its bootstrap timeout: keep one attempt short.
        bounded = {"bootstrap_timeout_ms": 5000} if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG else {}
        admin = KafkaAdminClient(bootstrap_servers=self.sasl_bootstrap, security_protocol="SASL_PLAINTEXT",
                                 sasl_mechanism=self.SASL_MECHANISMS[-1], sasl_plain_username=user,
                                 sasl_plain_password=Secret(password), request_timeout_ms=5000, **bounded)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def ready(self) -> bool:
        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def check(self) -> None:
        self.proc.check()

    def stop(self) -> bool:
        return self.proc.stop()


class DynamoDBEndpoint:
    """moto in server mode: the DynamoDB (and S3) HTTP API on localhost, talked to by plain boto3."""

    name = "DynamoDB endpoint"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.port = int(cfg.get_path("dynamodb.local.port"))
        self.proc = ManagedProcess(self.name, cfg.path("run_dir") / "dynamodb", HOST, self.port)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60) -> bool:
        server = Path(sys.executable).with_name("moto_server")
        if not server.exists():
            raise ServiceError(f"{server} is missing: run scripts/setup.sh (it installs moto[server])")
        return self.proc.start([str(server), "-H", HOST, "-p", str(self.port)], self.ready, timeout)

    def ready(self) -> bool:
        import boto3
        from botocore.config import Config as BotoConfig

        client = boto3.client("dynamodb", endpoint_url=self.url, region_name="us-east-1",
                              aws_access_key_id="local", aws_secret_access_key="local",
                              config=BotoConfig(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
        client.list_tables()
        return True

    def check(self) -> None:
        self.proc.check()

    def stop(self) -> bool:
        return self.proc.stop()


class SparkStandalone:
    """A local Spark standalone master and ``spark.local_cluster.workers`` workers, from the
    installed pyspark's own jars.

    Not needed by the demo or the tests that run Spark in-process; it is here to run the jobs with
    ``spark-submit --master spark://127.0.0.1:7077`` exactly as on a cluster: with two workers the
    tasks of one stage run in two executor JVMs, each with its own Python workers, as they would on
    two machines (docs/cluster.md).
    """

    name = "Spark standalone master"
    REGISTERED = "Successfully registered with master"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.port = int(cfg.get_path("spark.local_cluster.port"))
        home = cfg.path("run_dir") / "spark-standalone"
        self.proc = ManagedProcess(self.name, home / "master", HOST, self.port)
        self.workers = [ManagedProcess(f"Spark standalone worker {i + 1}", home / f"worker-{i + 1}", HOST, port)
                        for i, port in enumerate(worker_ports(cfg))]

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    @staticmethod
    def work_dir(worker: ManagedProcess) -> Path:
        """Its SPARK_WORKER_DIR: ``<app-id>/<executor-id>/stderr`` holds each executor's log."""
        return worker.home / "work"

    def _spark_class(self, *args: str) -> list[str]:
        import pyspark

        spark_home = Path(pyspark.__file__).parent
        return [str(spark_home / "bin" / "spark-class"), *args]

    def worker_command(self, worker: ManagedProcess) -> list[str]:
        """Cores and memory are per worker: each becomes one executor of that size."""
        return self._spark_class("org.apache.spark.deploy.worker.Worker", self.master_url,
                                 "--host", HOST, "--port", str(worker.port), "--webui-port", "0",
                                 "--cores", str(self.cfg.get_path("spark.local_cluster.worker_cores")),
                                 "--memory", str(self.cfg.get_path("spark.local_cluster.worker_memory")),
                                 "--work-dir", str(self.work_dir(worker)))

    def start(self, timeout: float = 60) -> bool:
        """The master, then each worker; returns once every worker has registered with the master
        (an application submitted earlier could get fewer executors than there are workers)."""
        from infra.process import port_open

        # SPARK_LOCAL_IP: the executors the workers launch bind to the loopback address too.
        env = {"SPARK_LOG_DIR": str(self.proc.home), "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": HOST}
        started = self.proc.start(self._spark_class("org.apache.spark.deploy.master.Master", "--host", HOST,
                                                     "--port", str(self.port), "--webui-port", "0"),
                                  lambda: port_open(HOST, self.port), timeout, env)
        for worker in self.workers:
            logged = _log_size(worker.log_file) if worker.pid() is None else 0
            worker.start(self.worker_command(worker),
                         lambda w=worker, offset=logged: port_open(HOST, w.port) and _logged_since(
                             w.log_file, offset, self.REGISTERED), timeout,
                         {**env, "SPARK_LOG_DIR": str(worker.home)})
        return started

    def check(self) -> None:
        self.proc.check()
        for worker in self.workers:
            worker.check()

    def stop(self) -> bool:
        """The workers first (they would otherwise retry the vanished master), then the master."""
        for worker in self.workers:
            worker.stop()
        return self.proc.stop()


def worker_ports(cfg: Config) -> list[int]:
    """``spark.local_cluster.worker_port`` + i for each of the ``workers``: distinct, none the master's."""
    count = int(cfg.get_path("spark.local_cluster.workers"))
    first = int(cfg.get_path("spark.local_cluster.worker_port"))
    master = int(cfg.get_path("spark.local_cluster.port"))
    if count < 1:
        raise ServiceError(f"spark.local_cluster.workers must be 1 or more (it is {count})")
    ports = [first + i for i in range(count)]
    if master in ports:
        raise ServiceError(f"spark.local_cluster.port {master} falls among the worker ports "
                           f"{ports[0]}-{ports[-1]} (worker_port + 0..workers-1): move one of them")
    return ports


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _logged_since(path: Path, offset: int, text: str) -> bool:
    """Whether ``text`` appears in the log after byte ``offset`` (the log is appended to across starts)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return text.encode() in log.read()
    except FileNotFoundError:
        return False


def all_services(cfg: Config) -> dict[str, KafkaBroker | DynamoDBEndpoint]:
    """The services the demo and the tests need (the Spark standalone cluster is started on request)."""
    return {"kafka": KafkaBroker(cfg), "dynamodb": DynamoDBEndpoint(cfg)}


def optional_services(cfg: Config) -> dict[str, SparkStandalone]:
    return {"spark": SparkStandalone(cfg)}
