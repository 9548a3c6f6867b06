"""The cluster REST API (FastAPI): thin routes over ``VMService``."""
