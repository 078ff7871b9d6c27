from monai_salm.evaluation.victim import VICTIM_RECIPE, classification_metrics, train_victim
