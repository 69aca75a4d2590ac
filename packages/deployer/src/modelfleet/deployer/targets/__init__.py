"""Deployment targets: local process, docker, aci, kubernetes."""
