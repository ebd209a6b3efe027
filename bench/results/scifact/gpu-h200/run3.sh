#!/usr/bin/env bash
# SciFact on one GPU: mine once, then train/eval several recipes; results appended as each finishes.
# Ran when mpr train's default learning rate was 2e-5 (now 5e-5): runs that used that default pass it explicitly here.
DEADLINE=290
source "$(dirname "$0")/harness.sh"
run ws2-lr2 --loss ws2 --learning-rate 2e-5 --save-steps 25 --eval-data $D --eval-steps 5
run ws2-lr5 --loss ws2 --learning-rate 5e-5 --save-steps 25 --eval-data $D --eval-steps 5
run jointlh-lr5 --loss jointlh --learning-rate 5e-5 --save-steps 25
run summarglh-lr5 --loss summarglh --learning-rate 5e-5 --save-steps 25
el ALLDONE
