"""``vidalign.teacher.v1``: generated protobuf and gRPC modules (do not edit)."""
