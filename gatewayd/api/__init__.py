"""The gRPC edge: the control and challenge services, protobuf translation and validation, listeners
(mTLS, authorization, limits). It calls the runtime; nothing below imports it."""
