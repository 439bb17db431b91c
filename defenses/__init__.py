from defenses.adversarial import AdversarialTraining
from defenses.robust import RobustAccuracy
from defenses.trades import TRADES
