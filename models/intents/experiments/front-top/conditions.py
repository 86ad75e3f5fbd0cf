"""The held-out test's conditions, in the order of the dump's condition
index, and which of them are the goal clips (clean, babble and pink noise
at 24, 18 and 12 dB). Shared by train.py and compare.py."""

CONDITIONS = ['clean', 'babble 24 dB', 'babble 18 dB', 'babble 12 dB', 'babble 6 dB',
              'pink 24 dB', 'pink 18 dB', 'pink 12 dB', 'pink 6 dB',
              'accent en-029, clean', 'accent en-029, babble 12 dB']
GOAL = [0, 1, 2, 3, 5, 6, 7]
