"""What MLflow loads the logged model's code from ("models from code": no pickled Python object in it)."""

from mlflow.models import set_model

from ami_dist.mlflow_model import Generator

set_model(Generator())
