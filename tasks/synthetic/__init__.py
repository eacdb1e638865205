"""The SYNTHETIC world: scripted agent profiles with known behaviour rates.

Everything here is synthetic and labelled so. Judges and estimators never import
`tasks.synthetic.profiles`; only the world itself and the tests that check the
statistics against the known truth do.
"""
