"""The two local services, defined from the configuration."""
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


class KafkaBroker:
    """A single-node Apache Kafka broker in KRaft mode (combined broker and controller)."""

    name = "Kafka broker"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.port = int(cfg.get_path("kafka.local.port"))
        self.controller_port = int(cfg.get_path("kafka.local.controller_port"))
        self.proc = ManagedProcess(self.name, cfg.path("run_dir") / "kafka", HOST, self.port)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def properties(self) -> str:
        data_dir = self.proc.home / "data"
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{HOST}:{self.controller_port}",
            f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
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
        if self.proc.pid() is None:
            config_file.write_text(self.properties())
            if not (home / "data" / "meta.properties").exists():
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
                result = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                                                   "-c", str(config_file)),
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise ServiceError(f"formatting the Kafka storage in {home / 'data'} failed:\n"
                                       f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return self.proc.start(self._java("kafka.Kafka", str(config_file)), self.ready, timeout)

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
    """A local Spark standalone master and one worker, from the installed pyspark's own jars.

    Not needed by the demo or the tests (they run Spark in-process); it is here to run the jobs
    with ``spark-submit --master spark://127.0.0.1:7077`` exactly as on a cluster.
    """

    name = "Spark standalone master"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.port = int(cfg.get_path("spark.local_cluster.port", 7077))
        home = cfg.path("run_dir") / "spark-standalone"
        self.proc = ManagedProcess(self.name, home / "master", HOST, self.port)
        self.worker = ManagedProcess("Spark standalone worker", home / "worker", HOST,
                                     int(cfg.get_path("spark.local_cluster.worker_port", 7078)))

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    def _spark_class(self, *args: str) -> list[str]:
        import pyspark

        spark_home = Path(pyspark.__file__).parent
        return [str(spark_home / "bin" / "spark-class"), *args]

    def start(self, timeout: float = 60) -> bool:
        from infra.process import port_open

        env = {"SPARK_LOG_DIR": str(self.proc.home), "PYSPARK_PYTHON": sys.executable,
               "SPARK_WORKER_DIR": str(self.worker.home / "work")}
        started = self.proc.start(self._spark_class("org.apache.spark.deploy.master.Master", "--host", HOST,
                                                     "--port", str(self.port), "--webui-port", "0"),
                                  lambda: port_open(HOST, self.port), timeout, env)
        memory = str(self.cfg.get_path("spark.local_cluster.worker_memory", "4g"))
        cores = str(self.cfg.get_path("spark.local_cluster.worker_cores", 2))
        self.worker.start(self._spark_class("org.apache.spark.deploy.worker.Worker", self.master_url,
                                            "--host", HOST, "--port", str(self.worker.port),
                                            "--webui-port", "0", "--cores", cores, "--memory", memory),
                          lambda: port_open(HOST, self.worker.port), timeout, env)
        return started

    def check(self) -> None:
        self.proc.check()
        self.worker.check()

    def stop(self) -> bool:
        self.worker.stop()
        return self.proc.stop()


def all_services(cfg: Config) -> dict[str, KafkaBroker | DynamoDBEndpoint]:
    """The services the demo and the tests need (the Spark standalone cluster is started on request)."""
    return {"kafka": KafkaBroker(cfg), "dynamodb": DynamoDBEndpoint(cfg)}


def optional_services(cfg: Config) -> dict[str, SparkStandalone]:
    return {"spark": SparkStandalone(cfg)}
