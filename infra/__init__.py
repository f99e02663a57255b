"""Local services for the demo and the tests: a real Kafka broker and a DynamoDB endpoint.

Each runs as a separate process on 127.0.0.1, started from the jars and packages the set-up step
installed, with its log and pid file under the run folder. Production uses real Kafka and real
DynamoDB through the same client code; nothing here runs there.
"""
