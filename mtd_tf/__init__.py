"""mtd_tf: multi-target detection with approximate EM and score-based priors.

Implements Zabatani, Kreymer and Bendory, "Score-based diffusion priors for
multi-target detection": the MTD measurement model (eq. 1-2), the approximate
EM of Kreymer, Singer and Bendory (eq. 9-16) and its score-prior M-step
(Algorithm 1, eq. 17-18).
"""

__version__ = "0.1.0"
