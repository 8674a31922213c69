"""The gateway (data plane): following the route table and proxying inference requests to ready replicas."""
