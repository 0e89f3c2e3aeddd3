"""crflow: a private container registry on your own cluster, installed by Prefect flows."""
