"""Generated protobuf and gRPC modules for package gatewayd.v1 (`make proto`); do not edit the *_pb2* files."""
