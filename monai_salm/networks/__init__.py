from monai_salm.networks.generator import NoiseGenerator, sign_code
from monai_salm.networks.surrogate import CLASSIFIERS, build_classifier
