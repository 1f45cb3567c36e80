// SPDX-License-Identifier: MIT
// slither-disable-next-line pragma: OpenZeppelin's files keep their own, wider ranges
pragma solidity ^0.8.30;

/**
 * @dev Consent of pseudonymous subjects to partners, per purpose and attribute set.
 *
 * A subject is a 32-byte keyed hash of a person's identifier: no personal data is ever passed to
 * or stored by this contract. Each subject has one controller key; only EIP-712 signatures of that
 * key change the subject's consents. The operator relays the signed messages and pays for gas, so
 * it can delay a change but never forge one.
 *
 * A customer who lost their key gets a new one through a recovery: the operator, having verified the
 * person out of band, starts it ({startRecovery}); it takes effect no sooner than {recoveryDelay}
 * later ({completeRecovery}), and until then the current key can veto it with its signature
 * ({cancelRecovery}), which anyone may submit, not only the operator. So the operator alone never
 * changes who speaks for a subject at once, and a customer who still holds their key can always stop
 * a recovery they did not ask for, even if the operator will not relay their veto.
 */
interface IConsentRegistry {
    /**
     * @dev A consent as stored, in one storage slot: the granted attribute bits (at most
     * {ATTRIBUTE_BITS} of them) and when they lapse (0 = until revoked). One slot, not two, because
     * every node keeps, hashes and copies each slot of the world state.
     */
    struct Consent {
        uint192 attributes;
        uint64 validUntil;
    }

    /// @dev Which signed message a {SignedChange} carries.
    enum ChangeKind {
        Grant,
        Revoke
    }

    /**
     * @dev A `ConsentGrant` or `ConsentRevoke` message of the subject's controller with its ECDSA
     * signature. One struct for both kinds so that a batch keeps the order in which the changes were
     * signed (a subject's nonces increase). `validUntil` is part of grants only and must be
     * 0 in a revocation.
     */
    struct SignedChange {
        ChangeKind kind;
        bytes32 subject;
        address partner;
        bytes32 purpose;
        uint256 attributes;
        uint64 validUntil;
        uint256 nonce;
        uint256 deadline;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    /// @dev The subject has no controller key yet, so nothing can be signed for it.
    error ConsentRegistryUnboundSubject(bytes32 subject);

    /// @dev The subject already has a controller; a change needs the current controller's signature.
    error ConsentRegistryControllerAlreadyBound(bytes32 subject, address controller);

    /// @dev The admin and the operator must be real accounts.
    error ConsentRegistryZeroAddress();

    /// @dev The zero address cannot control a subject.
    error ConsentRegistryInvalidController(address controller);

    /// @dev The message was signed by `signer`, but the subject's controller is `expected`.
    error ConsentRegistryInvalidSigner(address signer, address expected);

    /// @dev The signature's deadline has passed.
    error ConsentRegistryExpiredSignature(uint256 deadline);

    /// @dev `partner` does not hold the partner role.
    error ConsentRegistryUnknownPartner(address partner);

    /// @dev A grant or revocation must name at least one attribute.
    error ConsentRegistryEmptyAttributes();

    /// @dev `nonce` is used or passed (below `currentNonce`, the subject's next one; for a key change, not
    /// equal to it), or out of range; `account` is the subject's controller.
    error InvalidAccountNonce(address account, uint256 currentNonce);

    /// @dev A grant names an attribute bit above the highest a consent can hold (see {Consent}).
    error ConsentRegistryAttributesOutOfRange(uint256 attributes);

    /// @dev A grant's `validUntil` is already in the past.
    error ConsentRegistryInvalidValidity(uint64 validUntil);

    /// @dev `subject` has no recovery pending.
    error ConsentRegistryNoRecovery(bytes32 subject);

    /// @dev The recovery of `subject` takes effect at `effectiveAt`, not before.
    error ConsentRegistryRecoveryNotDue(bytes32 subject, uint64 effectiveAt);

    /// @dev A recovery delay must be at least `minimum` seconds (and fit a uint64 timestamp).
    error ConsentRegistryInvalidRecoveryDelay(uint64 delay, uint64 minimum);

    /// @dev Item `index` of a batch failed with `reason` (the inner revert data); nothing in the batch was applied.
    error ConsentRegistryBatchItemFailed(uint256 index, bytes reason);

    /// @dev `controller` now controls `subject` (`previous` is zero on the first binding).
    event ControllerBound(bytes32 indexed subject, address indexed previous, address indexed controller);

    /**
     * @dev The operator started moving control of `subject` from `controller` to `newController`; it
     * can take effect at `effectiveAt` unless `controller` vetoes it before.
     */
    event ControllerRecoveryStarted(
        bytes32 indexed subject, address indexed controller, address indexed newController, uint64 effectiveAt
    );

    /**
     * @dev The recovery of `subject` to `newController` was vetoed by `controller` (or superseded by
     * a key change it signed, or replaced by a new {startRecovery}).
     */
    event ControllerRecoveryCancelled(
        bytes32 indexed subject, address indexed controller, address indexed newController
    );

    /// @dev Recoveries started from now on wait `delay` seconds (was `previous`).
    event RecoveryDelaySet(uint64 previous, uint64 delay);

    /// @dev `granted` bits were granted; `attributes` is the resulting set, valid until `validUntil`.
    event ConsentGranted(
        bytes32 indexed subject,
        address indexed partner,
        bytes32 indexed purpose,
        uint256 granted,
        uint256 attributes,
        uint64 validUntil,
        uint256 nonce
    );

    /// @dev `revoked` bits were revoked; `attributes` is the resulting set.
    event ConsentRevoked(
        bytes32 indexed subject,
        address indexed partner,
        bytes32 indexed purpose,
        uint256 revoked,
        uint256 attributes,
        uint256 nonce
    );

    /**
     * @dev Binds `controller` to a subject that has none yet.
     *
     * Requirements:
     * - the caller has the operator role;
     * - `subject` has no controller and `controller` is not zero.
     */
    function bindController(bytes32 subject, address controller) external;

    /**
     * @dev Moves control of `subject` to `newController`, authorised by the current controller's
     * `ControllerChange` signature. A pending recovery of the subject is dropped (its key holder
     * has chosen the next key themselves).
     *
     * Requirements:
     * - the caller has the operator role;
     * - `deadline` has not passed, `nonce` is the subject's next nonce;
     * - the signature is the current controller's.
     */
    function rebindController(
        bytes32 subject,
        address newController,
        uint256 nonce,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    /**
     * @dev Starts moving control of `subject` to `newController` without the current key (which the
     * customer lost), after the operator verified the customer. It takes effect at
     * `block.timestamp + recoveryDelay()` through {completeRecovery}; until then the current key still
     * controls the subject and can veto it ({cancelRecovery}). Starting again replaces a pending
     * recovery (announced with {ControllerRecoveryCancelled}) and restarts its wait, never ending
     * before the replaced one's `effectiveAt`.
     *
     * Requirements:
     * - the caller has the operator role;
     * - `subject` is bound, and `newController` is neither zero nor its current controller.
     */
    function startRecovery(bytes32 subject, address newController) external;

    /**
     * @dev Makes a pending recovery effective: `newController` controls the subject from now on, and
     * every signature of the old key is refused. The subject's nonce is left as it is (the signer
     * check already refuses the old key's messages; see the README, "Recovering a lost key").
     *
     * Requirements:
     * - the caller has the operator role;
     * - a recovery of `subject` is pending and its `effectiveAt` has come.
     */
    function completeRecovery(bytes32 subject) external;

    /**
     * @dev Drops the pending recovery of `subject`, vetoed by the current controller's
     * `RecoveryCancel` signature. The message names the recovery (its new key and `effectiveAt`), so
     * it cancels that one recovery only and needs no nonce: replaying it finds nothing to cancel.
     * Anyone may send it (the signature is what authorises it): the operator relays it, and a customer
     * whose operator will not can send it from any funded account of their own.
     *
     * Requirements:
     * - `deadline` has not passed;
     * - the recovery of `subject` to `newController` effective at `effectiveAt` is pending;
     * - the signature is the current controller's.
     */
    function cancelRecovery(
        bytes32 subject,
        address newController,
        uint64 effectiveAt,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    /**
     * @dev Sets how long recoveries started from now on wait (pending ones keep their time).
     *
     * Requirements:
     * - the caller has the admin role;
     * - `delay` is at least {MIN_RECOVERY_DELAY} and at most 10 years.
     */
    function setRecoveryDelay(uint64 delay) external;

    /// @dev The pending recovery of `subject`: its new key and when it can take effect (zeros if none).
    function recoveryOf(bytes32 subject) external view returns (address newController, uint64 effectiveAt);

    /// @dev How long a recovery started now waits before it can take effect, in seconds.
    function recoveryDelay() external view returns (uint64);

    /**
     * @dev Applies one signed grant or revocation. A grant adds its bits to the subject's consent
     * for (partner, purpose) and sets when the whole consent lapses; a consent that has lapsed
     * starts again from nothing. A revocation removes its bits; revoking bits that were never
     * granted is allowed (the subject's intent is recorded all the same).
     *
     * Requirements:
     * - the caller has the operator role;
     * - `deadline` has not passed and `attributes` is not empty;
     * - the subject is bound, `nonce` is at least the subject's next nonce (and below 2^96 - 1), and
     *   the signature is the controller's over this contract's EIP-712 domain. The subject's next
     *   nonce becomes `nonce + 1`: a nonce below it that never applied (a change that failed, or
     *   was never sent) can no longer apply, so changes apply in the order they were signed, once;
     * - for a grant: the partner holds the partner role, `attributes` fits in a {Consent}'s 192 bits
     *   and `validUntil` is 0 or in the future;
     * - for a revocation: `validUntil` is 0.
     */
    function applyChange(SignedChange calldata change) external;

    /**
     * @dev Applies signed changes in order, all or nothing.
     *
     * Requirements: each item meets the requirements of {applyChange}; the first that does not
     * reverts the whole call with {ConsentRegistryBatchItemFailed} naming its index and reason.
     */
    function applyBatch(SignedChange[] calldata changes) external;

    /// @dev The controller of `subject`, or zero.
    function controllerOf(bytes32 subject) external view returns (address);

    /**
     * @dev The least nonce the next signed change about `subject` may carry (a key change: exactly
     * this one). Nonces belong to the
     * subject, not to its key: they count on across a change of controller, and they share the
     * controller's storage slot (one slot fewer per customer for every node to hash and copy).
     */
    function nonceOf(bytes32 subject) external view returns (uint256);

    /// @dev The stored consent, expired or not.
    function consentOf(bytes32 subject, address partner, bytes32 purpose) external view returns (Consent memory);

    /**
     * @dev Whether `partner` may now use every attribute in `attributes` of `subject` for `purpose`:
     * all bits granted, not expired, and the partner still holds the partner role. An empty
     * `attributes` is never permitted.
     */
    function isPermitted(bytes32 subject, address partner, bytes32 purpose, uint256 attributes)
        external
        view
        returns (bool);
}
