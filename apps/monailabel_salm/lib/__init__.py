"""Library of the monai-salm MONAI Label app (``apps/monailabel_salm``)."""
