from monai_salm.engines.checkpoint import (
    MAX_CLASSES,
    SALMSettings,
    load_protection,
    protection_transforms,
    save_protection,
    slim_protection,
)
from monai_salm.engines.trainer import INDEX_KEY, MASK_MODES, SALMTrainer
from monai_salm.engines.monitor import FreshModelMonitor
from monai_salm.engines.reader import train_reader
