# Shared by resume_test.sh and kill_during_write_test.sh (sourced).
# same_final_state A B STEP: the model and optimizer files (one each, or the shards and their indexes)
# of checkpoint STEP under folders A and B are byte-identical; prints the first that differs and
# returns 1 otherwise.
same_final_state() {
  local last f
  last=step-$(printf %06d "$3")
  if ! compgen -G "$1/$last/model*.safetensors" > /dev/null; then
    echo "FAIL: $1/$last holds no model file" >&2
    return 1
  fi
  for f in $(cd "$1/$last" && ls model* optimizer*); do
    if ! cmp -s "$1/$last/$f" "$2/$last/$f"; then
      echo "FAIL: $last/$f differs between $1 and $2" >&2
      return 1
    fi
  done
}
